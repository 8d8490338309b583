"""Detect objects with the sample YOLOv4-tiny, built and run by Kiln.

    python examples/yolov4_tiny_detect.py [--image img.npy] [--device cuda] [--check]

The weights are random (seeded), so the detections mean nothing: this exercises the toolchain
(Kiln runs the network; decoding and NMS run in torch).
"""
from __future__ import annotations

import os

try:
    from examples import _cli
except ImportError:  # run as a script: examples/ is on sys.path, the repository root is not
    import _cli  # type: ignore[no-redef]

from examples.zoo import yolov4_tiny
from examples.zoo.yolo_decode import decode_outputs, nms


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = _cli.common_args(__doc__.splitlines()[0], "yolov4_tiny")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default: %(default)s)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default: %(default)s)")
    p.add_argument("--max-det", type=int, default=20, help="detections printed per image (default: %(default)s)")
    args = p.parse_args(argv)
    x = _cli.load_input(args.image, yolov4_tiny.INPUT_SHAPE, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.onnx)), exist_ok=True)
    yolov4_tiny.save_onnx(args.onnx, seed=args.seed, batch=x.shape[0])
    print(f"saved {args.onnx} (batch {x.shape[0]})")
    outs = _cli.run_with_kiln(args.onnx, x, args.device, args.fp16)
    rows = decode_outputs(outs["head13"].astype("float32"), outs["head26"].astype("float32"))
    for i in range(rows.shape[0]):
        boxes, scores, classes = nms(rows[i], args.conf, args.iou, max_det=args.max_det)
        print(f"image {i}: {len(boxes)} detections (score > {args.conf}, first {args.max_det})")
        for b, s, c in zip(boxes.tolist(), scores.tolist(), classes.tolist()):
            print(f"  class {c:2d}  score {s:.3f}  box x1={b[0]:.1f} y1={b[1]:.1f} x2={b[2]:.1f} y2={b[3]:.1f}")
    if args.check:
        _cli.check_against_torch(yolov4_tiny.build_torch(args.seed), x, outs, ["head13", "head26"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
