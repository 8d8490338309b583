"""Classify an image with the sample ResNet-50, built and run by Kiln.

    python examples/resnet50_classify.py [--image img.npy] [--device cuda] [--check]

The weights are random (seeded), so the classes mean nothing: this exercises the toolchain.
"""
from __future__ import annotations

import os

import numpy as np

try:
    from examples import _cli
except ImportError:  # run as a script: examples/ is on sys.path, the repository root is not
    import _cli  # type: ignore[no-redef]

from examples.zoo import resnet50


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = _cli.common_args(__doc__.splitlines()[0], "resnet50").parse_args(argv)
    x = _cli.load_input(args.image, resnet50.INPUT_SHAPE, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.onnx)), exist_ok=True)
    resnet50.save_onnx(args.onnx, seed=args.seed, batch=x.shape[0])
    print(f"saved {args.onnx} (batch {x.shape[0]})")
    logits = _cli.run_with_kiln(args.onnx, x, args.device, args.fp16)["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for i, p in enumerate(probs):
        top = np.argsort(-p)[:5]
        print(f"image {i}: " + ", ".join(f"class {c} ({p[c]:.3f})" for c in top))
    if args.check:
        _cli.check_against_torch(resnet50.build_torch(args.seed), x, {"logits": logits}, ["logits"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
