"""`make demo`: Kiln's main job on the bundled sample ResNet-50, checked against an independent oracle.

    python examples/demo.py prepare DIR   # the model as ONNX, two input images, the oracle's logits
    kiln build DIR/resnet50.onnx -o DIR/resnet50.kiln
    kiln run DIR/resnet50.kiln --input input=DIR/images.npy --check logits=DIR/expected_logits.npy
    python examples/demo.py report DIR    # Kiln's logits per image: top-5, spread, error against the oracle

The model is examples/zoo/resnet50.py: ResNet-50 v1.5 with seeded random weights whose batch-norm
statistics are calibrated on random images, so its logits spread out and follow the input (onnx's
"light" models, which the demo used before, output a constant 0.001 vector whatever the input). The
oracle is the same network as a torch module, run in float64 by PyTorch eager: no Kiln code and no ONNX
file between it and the expected logits. `report` fails (exit 1) when Kiln's logits are off the oracle's,
or when they do not change with the image.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python examples/demo.py`: the repository root is not on the path
    sys.path.insert(0, ROOT)

SEED = 0          # weight seed of the sample network
IMAGES = 2        # two different random images, one batch
RTOL = 1e-4       # normwise: max |kiln - oracle| / max |oracle| (Kiln runs float32)
MIN_SPREAD = 0.1  # the logits' std per image, and the largest change between the two images, must exceed this


def prepare(folder: str) -> None:
    """Write resnet50.onnx, images.npy (float32 [2,3,224,224]) and expected_logits.npy (float64)."""
    import torch

    from examples.zoo import resnet50
    os.makedirs(folder, exist_ok=True)
    path = resnet50.save_onnx(os.path.join(folder, "resnet50.onnx"), seed=SEED, batch=IMAGES)
    images = np.random.default_rng(2024).standard_normal((IMAGES, *resnet50.INPUT_SHAPE)).astype(np.float32)
    np.save(os.path.join(folder, "images.npy"), images)
    with torch.no_grad():
        want = resnet50.build_torch(SEED).double().eval()(torch.from_numpy(images).double()).numpy()
    np.save(os.path.join(folder, "expected_logits.npy"), want)
    print(f"demo: wrote {path} (sample ResNet-50 v1.5, seed {SEED}, batch {IMAGES}), {IMAGES} random images, "
          f"and the oracle's logits (PyTorch eager, float64, same weights) in {folder}")


def spread(logits: np.ndarray) -> tuple[list[float], float]:
    """(std of each image's logits, largest change of a logit between the images)."""
    per_image = [float(row.std()) for row in logits]
    change = float(np.abs(logits[0] - logits[1:]).max()) if len(logits) > 1 else 0.0
    return per_image, change


def report(folder: str) -> int:
    """Run the plan on the images; print top-5 and spread per image and the error; 0 when it all holds."""
    from kiln.runtime.engine import Engine
    engine = Engine.load(os.path.join(folder, "resnet50.kiln"))
    images = np.load(os.path.join(folder, "images.npy"))
    want = np.load(os.path.join(folder, "expected_logits.npy"))
    got = engine.create_execution_context().execute({"input": images})["logits"].astype(np.float64)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    stds, change = spread(got)
    for i, row in enumerate(got):
        p = np.exp(row - row.max())
        p /= p.sum()
        top = np.argsort(-row)[:5]
        print(f"image {i}: top-5 " + ", ".join(f"class {c} ({p[c]:.3f})" for c in top)
              + f"; logits std {stds[i]:.3f}, range {row.min():.3f}..{row.max():.3f}")
    print(f"between the two images: largest logit change {change:.3f}; "
          f"Kiln vs the float64 oracle: max |diff| / max |oracle| = {err:.2e} (tolerance {RTOL:g})")
    ok_err, ok_spread = err <= RTOL, min(stds) > MIN_SPREAD and change > MIN_SPREAD
    if not ok_spread:
        print(f"demo check FAILED: the logits barely depend on the input (std {min(stds):.3g}, change {change:.3g}, "
              f"need > {MIN_SPREAD}): the comparison would prove little")
    elif not ok_err:
        print(f"demo check FAILED: Kiln's logits are off the oracle's by {err:.2e} (> {RTOL:g})")
    else:
        print("demo check PASSED: Kiln's logits match the independent float64 oracle, and they follow the input")
    return 0 if ok_err and ok_spread else 1


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["prepare", "report"])
    ap.add_argument("folder", help="where the model, images, oracle logits and plan live")
    args = ap.parse_args(argv)
    if args.step == "prepare":
        prepare(args.folder)
        return 0
    from kiln.errors import KilnError
    try:
        return report(args.folder)
    except (KilnError, OSError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
