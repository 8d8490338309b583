"""Detect objects with YOLOv4 built by Kiln: letterbox, the plan (network + decode + NMS), boxes drawn.

    python examples/yolov4/detect.py [--weights yolov4.weights] [--size 416|608] [--image IMG]
                                     [--device cpu|cuda] [--fp16] [--int8] [--plan FILE] [--out boxes.png]

Without --weights the weights are random (seeded) and the detections meaningless; the official
yolov4.weights fit yolov4.cfg beside this script (416x416; --size 608 edits the .cfg's width and height).
Without --image a test image of shapes is drawn. Prints the detections and a per-stage latency table.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script: the repository root holds the examples package
    sys.path.insert(0, ROOT)

from examples.yolo_pipeline import main  # noqa: E402

CFG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "yolov4.cfg")

if __name__ == "__main__":
    raise SystemExit(main(None, "YOLOv4", CFG, default_runs=5))
