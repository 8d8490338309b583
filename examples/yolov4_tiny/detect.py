"""Detect objects with YOLOv4-tiny built by Kiln: letterbox, the plan (network + decode + NMS), boxes drawn.

    python examples/yolov4_tiny/detect.py [--weights yolov4-tiny.weights] [--image IMG] [--device cpu|cuda]
                                          [--fp16] [--int8] [--size 416] [--plan FILE] [--out boxes.png]

Without --weights the weights are random (seeded) and the detections meaningless; the official
yolov4-tiny.weights fit yolov4-tiny.cfg beside this script. Without --image a test image of shapes is drawn.
Prints the detections and a per-stage latency table (preprocess, upload, inference, download, draw).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # run as a script: the repository root holds the examples package
    sys.path.insert(0, ROOT)

from examples.yolo_pipeline import main  # noqa: E402

CFG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "yolov4-tiny.cfg")

if __name__ == "__main__":
    raise SystemExit(main(None, "YOLOv4-tiny", CFG, default_runs=20))
