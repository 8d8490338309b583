"""Tile sweep of the INT8 Triton conv (cuda.triton_qconv) over ResNet-50's distinct conv shapes, beside FP16.

    python benchmarks/qconv_sweep.py                        # H200: batch 256, every shape, <= 12 int8 configs each
    python benchmarks/qconv_sweep.py --shapes stem,l1.3x3 --max-configs 20 --out /tmp/sweep.md
    python benchmarks/qconv_sweep.py --smoke                # CPU, Triton interpreter: tiny sizes, crash check only

For each shape the QConv layer is int8 in / int8 out with per-channel power-of-two scales, a bias and ReLU (no
residual), built through the tactic (`configs` at optimization level `--level`, default 4: every tile of
QTILES that fits, the split-K and stem configs, capped at `--max-configs`). Beside it: torch's FP16
channels-last conv2d with bias (cuDNN, benchmark mode; the ReLU not included) and, unless
`--fp16-triton-configs 0`, the best of Kiln's FP16 Triton conv (cuda.triton_conv's tile configs, ReLU fused).

Timing: CUDA events around one call, the GPU held busy by a sleep kernel first so that host launch overhead is
not measured; median of `--runs` after `--warmup`. Every int8 config's output must equal the first config's
bit for bit (power-of-two scales: the result does not depend on the tiling), and the first config is checked
against the op's float64 reference on the first two images. Triton variants are compiled first in parallel
worker processes (kiln.backends.cuda.triton_launch.precompile); `--budget-s` stops the sweep early (what
finished is printed) so that a run fits a time-limited machine.

Prints a markdown table per shape (every config: ms, TOPS) and a summary over the shapes with the sum over
ResNet-50's 53 convs (each shape counted by its multiplicity).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class ConvShape:
    """One conv of the network: C -> K channels, a square kernel, stride and padding on a square input."""

    name: str
    c: int
    k: int
    kernel: int
    stride: int
    pad: int
    hw: int
    count: int

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.kernel) // self.stride + 1

    def label(self) -> str:
        s = f" s{self.stride}" if self.stride > 1 else ""
        return f"{self.kernel}x{self.kernel} {self.c}->{self.k} @{self.hw}{s}"

    def smoke(self) -> "ConvShape":
        """A small version for the interpreter: channels / 8 (at least 16; the stem keeps its 3), spatial / 4."""
        def ch(v: int) -> int:
            return v if v < 16 else max(16, v // 8)
        return ConvShape(self.name, ch(self.c), ch(self.k), self.kernel, self.stride, self.pad,
                         max(self.kernel + 1, self.hw // 4), self.count)


# torchvision's ResNet-50 v1.5 (the stride in the 3x3 of each stage's first block), 53 convs in all
RESNET50: list[ConvShape] = [
    ConvShape("stem", 3, 64, 7, 2, 3, 224, 1),
    ConvShape("l1.1x1a", 64, 64, 1, 1, 0, 56, 1),
    ConvShape("l1.3x3", 64, 64, 3, 1, 1, 56, 3),
    ConvShape("l1.1x1up", 64, 256, 1, 1, 0, 56, 4),  # 3 expansions + the downsample (stride 1 here)
    ConvShape("l1.1x1down", 256, 64, 1, 1, 0, 56, 2),
    ConvShape("l2.1x1a", 256, 128, 1, 1, 0, 56, 1),
    ConvShape("l2.3x3s2", 128, 128, 3, 2, 1, 56, 1),
    ConvShape("l2.1x1up", 128, 512, 1, 1, 0, 28, 4),
    ConvShape("l2.ds", 256, 512, 1, 2, 0, 56, 1),
    ConvShape("l2.1x1down", 512, 128, 1, 1, 0, 28, 3),
    ConvShape("l2.3x3", 128, 128, 3, 1, 1, 28, 3),
    ConvShape("l3.1x1a", 512, 256, 1, 1, 0, 28, 1),
    ConvShape("l3.3x3s2", 256, 256, 3, 2, 1, 28, 1),
    ConvShape("l3.1x1up", 256, 1024, 1, 1, 0, 14, 6),
    ConvShape("l3.ds", 512, 1024, 1, 2, 0, 28, 1),
    ConvShape("l3.1x1down", 1024, 256, 1, 1, 0, 14, 5),
    ConvShape("l3.3x3", 256, 256, 3, 1, 1, 14, 5),
    ConvShape("l4.1x1a", 1024, 512, 1, 1, 0, 14, 1),
    ConvShape("l4.3x3s2", 512, 512, 3, 2, 1, 14, 1),
    ConvShape("l4.1x1up", 512, 2048, 1, 1, 0, 7, 3),
    ConvShape("l4.ds", 1024, 2048, 1, 2, 0, 14, 1),
    ConvShape("l4.1x1down", 2048, 512, 1, 1, 0, 7, 2),
    ConvShape("l4.3x3", 512, 512, 3, 1, 1, 7, 2),
]
SMOKE_SHAPES = "stem,l1.3x3,l2.ds,l4.1x1up"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 256; --smoke: 2)")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated shape names or indices (default all; --smoke: " + SMOKE_SHAPES + ")")
    ap.add_argument("--level", type=int, default=4, help="optimization level of the tactic's configs (default 4)")
    ap.add_argument("--max-configs", type=int, default=None, help="int8 configs per shape (default 12; --smoke: 2)")
    ap.add_argument("--fp16-triton-configs", type=int, default=None,
                    help="FP16 Triton conv configs per shape, 0: skip (default 5; --smoke: 1)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per config (default 20; --smoke: 2)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--x-zp", type=int, default=0, help="the input's zero point (default 0, symmetric int8)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop starting shapes after this many seconds")
    ap.add_argument("--no-precompile", action="store_true", help="compile each variant on first use instead")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; on a machine without CUDA under the "
                                                         "Triton interpreter (a crash check, not a measurement)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    a = ap.parse_args(argv)
    if a.out:
        from kiln.errors import KilnError
        from kiln.fileio import check_writable
        try:
            check_writable(a.out, "results")
        except KilnError as e:
            ap.error(str(e))
    a.batch = a.batch or (2 if a.smoke else 256)
    a.shapes = a.shapes or (SMOKE_SHAPES if a.smoke else None)
    a.max_configs = a.max_configs if a.max_configs is not None else (3 if a.smoke else 12)
    a.fp16_triton_configs = a.fp16_triton_configs if a.fp16_triton_configs is not None else (1 if a.smoke else 5)
    a.runs = a.runs or (2 if a.smoke else 20)
    return a


def select_shapes(spec: str | None) -> list[tuple[int, ConvShape]]:
    """The shapes named (or numbered) in `spec`, all without one."""
    if not spec:
        return list(enumerate(RESNET50))
    out = []
    for tok in (t.strip() for t in spec.split(",") if t.strip()):
        hits = [(i, s) for i, s in enumerate(RESNET50) if s.name == tok or str(i) == tok]
        if not hits:
            raise SystemExit(f"unknown shape '{tok}'; known: " + ", ".join(s.name for s in RESNET50))
        out += hits
    return out


def cfg_label(cfg: dict[str, Any]) -> str:
    """A config in one short cell: MxNxK, warps, stages and its walk / split."""
    s = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg.get('num_warps', 4)} s{cfg.get('num_stages', 3)}"
    for key in ("ROWS", "FLAT", "LINEAR", "TAPS", "S2D"):
        if cfg.get(key):
            s += f" {key}"
    if int(cfg.get("SPLIT_K", 1)) > 1:
        s += f" sk{cfg['SPLIT_K']}"
    return s


class _Log:
    """The logger precompile() reports to."""

    def info(self, msg: str) -> None:
        print(f"[sweep] {msg}", file=sys.stderr, flush=True)

    warning = info

    def verbose(self, msg: str) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("qconv_sweep: no CUDA device (use --smoke for the interpreter check)", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton.jit is imported
    sweep = Sweep(args, torch.device("cuda" if cuda else "cpu"))
    return sweep.run(select_shapes(args.shapes))


class Sweep:
    """One run: builds each shape's tensors, times the configs, collects the markdown."""

    def __init__(self, args: argparse.Namespace, device: Any) -> None:
        import torch
        import torch.nn.functional as F
        import kiln.backends  # noqa: F401  (registers the tactics)
        from kiln.backends.cuda import triton_launch
        from kiln.backends.cuda.triton_conv import conv2d_nhwc, pack_conv_weight, tile_configs
        from kiln.backends.cuda.triton_qlayers import TritonQConv  # noqa: F401
        from kiln.backends.tactic import TacticContext, get_tactic
        from kiln.ir.dtype import DType
        from kiln.ir.graph import Node, Value
        from kiln.ir.types import TensorType
        from kiln.ops.activations import Epilogue
        from kiln.ops.conv import ConvGeometry
        from kiln.ops.registry import lookup
        self.torch, self.F, self.args, self.device = torch, F, args, device
        self.cuda = device.type == "cuda"
        self.tl = triton_launch
        self.conv2d_nhwc, self.pack_conv_weight, self.tile_configs = conv2d_nhwc, pack_conv_weight, tile_configs
        self.ctx = TacticContext(device, extra={"opt_level": args.level})
        self.tactic = get_tactic("cuda.triton_qconv")
        self.DType, self.Node, self.Value, self.TensorType = DType, Node, Value, TensorType
        self.Epilogue, self.ConvGeometry, self.ref = Epilogue, ConvGeometry, lookup("QConv", "kiln")
        self.lines: list[str] = []
        self.summary: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    # ---- output ------------------------------------------------------------------------------------------

    def emit(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    # ---- problem ---------------------------------------------------------------------------------------

    def problem(self, s: ConvShape) -> dict[str, Any]:
        """Seeded int8 input and weight, the QConv node, and the FP16 twins of the tensors."""
        torch = self.torch
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(1000 + s.c * 7 + s.k * 13 + s.hw)
        n = self.args.batch
        x = torch.randint(-128, 128, (n, s.c, s.hw, s.hw), generator=g, dtype=torch.int8, device=dev)
        w = torch.randint(-128, 128, (s.k, s.c, s.kernel, s.kernel), generator=g, dtype=torch.int8, device=dev).cpu()
        g = torch.Generator().manual_seed(s.c * 3 + s.k)
        bias = (torch.randint(-64, 65, (s.k,), generator=g) * 2.0 ** -3).to(torch.float32)
        w_scales = [2.0 ** -int(e) for e in torch.randint(6, 10, (s.k,), generator=g)]
        kred = s.c * s.kernel * s.kernel
        # std of v ~ sqrt(kred) * 74^2 * x_scale * w_scale: an output scale spreading it over the int8 range
        v_std = kred ** 0.5 * 74.0 ** 2 * 2.0 ** -4 * 2.0 ** -7.5
        y_scale = 2.0 ** round(torch.log2(torch.tensor(v_std / 40.0)).item())
        oh = s.out_hw
        attrs = {"x_scale": 2.0 ** -4, "x_zero_point": self.args.x_zp, "w_scales": w_scales,
                 "strides": [s.stride] * 2, "pads": [s.pad] * 4, "dilations": [1, 1], "group": 1,
                 "kernel_shape": [s.kernel] * 2, "activation": "Relu", "alpha": 0.0, "beta": 0.0,
                 "act_before_add": 0, "y_scale": y_scale, "y_zero_point": 0, "out_dtype": 3}
        T, V = self.TensorType, self.Value
        node = self.Node("QConv", [V("x", T(self.DType.INT8, (n, s.c, s.hw, s.hw))), V("w", const=w),
                                   V("b", const=bias)],
                         [V("y", T(self.DType.INT8, (n, s.k, oh, oh)))], attrs, name=s.name, domain="kiln")
        cl = torch.channels_last
        xd = x.contiguous(memory_format=cl)
        f16 = torch.float16 if self.cuda else torch.float32  # the CPU check runs the float twin in float32
        return {"node": node, "x": xd, "w": w, "bias": bias,
                "x16": (x.to(self.device, f16) / 64).contiguous(memory_format=cl),
                "w16": (w.to(self.device, f16) / 512).contiguous(memory_format=cl),
                "b16": bias.to(self.device, f16), "m": n * oh * oh, "kred": kred}

    # ---- timing ----------------------------------------------------------------------------------------

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median ms of one call: CUDA events with the GPU held busy while the host launches (no launch
        overhead in the number); perf_counter on the CPU."""
        torch = self.torch
        for _ in range(self.args.warmup):
            fn()
        samples = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(self.args.runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(1_000_000)  # ~0.5 ms of spinning: the launch below queues behind it
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
        else:
            for _ in range(self.args.runs):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    # ---- one shape -------------------------------------------------------------------------------------

    def int8_configs(self, p: dict[str, Any]) -> list[dict[str, Any]]:
        return self.tactic.configs(p["node"], self.ctx)[: self.args.max_configs]

    def fp16_setup(self, s: ConvShape, p: dict[str, Any]) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
        """(geometry, epilogue, packed FP16 weight, tile configs) of the FP16 Triton conv."""
        geo = self.ConvGeometry((s.stride,) * 2, (s.pad,) * 4, (1, 1), 1, (s.kernel,) * 2)
        cfgs = self.tile_configs(p["m"], s.k, s.c, 3, p["kred"])
        if s.c < 16 and s.kernel > 1:  # the FP16 tactic's own stem configs
            bn = 32 if s.k <= 32 else 64
            cfgs = [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 8, "FLAT": True, "num_warps": 4,
                     "num_stages": 3} for bm in (128, 64)] + cfgs
        return geo, self.Epilogue("Relu"), self.pack_conv_weight(p["w16"]), cfgs[: self.args.fp16_triton_configs]

    def record(self, shapes: list[tuple[int, ConvShape]]) -> list[dict[str, Any]]:
        """Every launch the sweep will make, recorded without running (for the parallel precompile)."""
        recipes: list[dict[str, Any]] = []
        with self.tl.recording() as rec:
            for _, s in shapes:
                p = self.problem(s)
                for cfg in self.int8_configs(p):
                    try:
                        self.tactic.make(p["node"], cfg, self.device)(p["x"], None, None, None)
                    except Exception:  # reported when timed
                        pass
                if self.args.fp16_triton_configs > 0:
                    geo, ep, wp, cfgs = self.fp16_setup(s, p)
                    for cfg in cfgs:
                        try:
                            self.conv2d_nhwc(p["x16"], wp, p["b16"], None, geo, ep, cfg)
                        except Exception:
                            pass
                del p
            recipes = list(rec)
        return recipes

    def check_reference(self, s: ConvShape, p: dict[str, Any], kern: Any) -> bool:
        """The first config on the first two images against the op's float64 reference (exact: pow2 scales)."""
        x2 = p["x"][:2]
        got = kern(x2, None, None, None)
        want = self.ref.compute(p["node"], x2, p["w"].to(self.device), p["bias"].to(self.device))
        return bool(self.torch.equal(got.cpu(), want.cpu()))

    def shape(self, idx: int, s: ConvShape) -> None:
        torch = self.torch
        p = self.problem(s)
        m, kred = p["m"], p["kred"]
        ops = 2.0 * m * s.k * kred
        self.emit(f"### {idx}: {s.name}, {s.label()} (x{s.count}): M={m} N={s.k} K={kred}")
        self.emit()
        self.emit("| int8 config | ms | TOPS | exact |")
        self.emit("|---|---:|---:|---|")
        first = None
        best: tuple[float, str] | None = None
        for cfg in self.int8_configs(p):
            label = cfg_label(cfg)
            try:
                kern = self.tactic.make(p["node"], cfg, self.device)
                y = kern(p["x"], None, None, None)
                if first is None:
                    first = y
                    exact = "ref ok" if self.check_reference(s, p, kern) else "REF MISMATCH"
                else:
                    exact = "yes" if torch.equal(y, first) else "MISMATCH"
                del y
                ms = self.time_ms(lambda: kern(p["x"], None, None, None))
            except Exception as e:  # a variant that does not compile here (shared memory, registers)
                self.emit(f"| {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
                continue
            self.emit(f"| {label} | {ms:.4f} | {ops / ms / 1e9:.1f} | {exact} |")
            if exact.endswith("MISMATCH"):
                continue
            if best is None or ms < best[0]:
                best = (ms, label)
        del first
        cudnn = self.time_ms(lambda: self.F.conv2d(p["x16"], p["w16"], p["b16"], s.stride, s.pad))
        tri: tuple[float, str] | None = None
        if self.args.fp16_triton_configs > 0:
            geo, ep, wp, cfgs = self.fp16_setup(s, p)
            for cfg in cfgs:
                try:
                    ms = self.time_ms(lambda: self.conv2d_nhwc(p["x16"], wp, p["b16"], None, geo, ep, cfg))
                except Exception:
                    continue
                if tri is None or ms < tri[0]:
                    tri = (ms, cfg_label(cfg))
        self.emit()
        fp16 = min(cudnn, tri[0]) if tri else cudnn
        line = f"cuDNN FP16 conv+bias {cudnn:.4f} ms"
        if tri:
            line += f"; Triton FP16 best {tri[1]} {tri[0]:.4f} ms"
        if best:
            line = f"best int8 **{best[1]} {best[0]:.4f} ms** ({ops / best[0] / 1e9:.1f} TOPS); " + line
            line += f"; int8 / best FP16 = {best[0] / fp16:.2f}"
        self.emit(line)
        self.emit()
        self.summary.append({"idx": idx, "s": s, "best": best, "cudnn": cudnn, "tri": tri, "ops": ops})

    # ---- driver ----------------------------------------------------------------------------------------

    def run(self, shapes: list[tuple[int, ConvShape]]) -> int:
        torch = self.torch
        a = self.args
        if a.smoke:
            shapes = [(i, s.smoke()) for i, s in shapes]
        dev = torch.cuda.get_device_name() if self.cuda else "CPU (Triton interpreter)"
        self.emit(f"# INT8 conv sweep (cuda.triton_qconv): ResNet-50 shapes, batch {a.batch}")
        self.emit()
        self.emit(f"Device: {dev}; torch {torch.__version__}; level {a.level}, <= {a.max_configs} int8 configs per "
                  f"shape; median of {a.runs}; x zero point {a.x_zp}" + ("; SMOKE sizes" if a.smoke else ""))
        self.emit()
        if self.cuda and not a.no_precompile:
            t0 = time.perf_counter()
            recipes = self.record(shapes)
            n = self.tl.precompile(recipes, _Log())
            self.emit(f"Precompiled {n} Triton variants of {len(recipes)} launches in {time.perf_counter() - t0:.1f} s")
            self.emit()
        done = 0
        for idx, s in shapes:
            if time.perf_counter() - self.t0 > a.budget_s:
                self.emit(f"(budget of {a.budget_s:.0f} s spent: {len(shapes) - done} shapes not run)")
                break
            self.shape(idx, s)
            done += 1
            if self.cuda:
                torch.cuda.empty_cache()
        self.totals()
        self.emit(f"\nWall time {time.perf_counter() - self.t0:.1f} s")
        if a.out:
            from kiln.fileio import atomic_write
            atomic_write(a.out, ("\n".join(self.lines) + "\n").encode(), "results")
        return 0

    def totals(self) -> None:
        self.emit("## Summary")
        self.emit()
        self.emit("| # | shape | count | best int8 config | int8 ms | TOPS | cuDNN FP16 ms | Triton FP16 ms | "
                  "int8 / best FP16 |")
        self.emit("|---:|---|---:|---|---:|---:|---:|---:|---:|")
        tot = {"int8": 0.0, "cudnn": 0.0, "tri": 0.0, "fp16": 0.0}
        for r in self.summary:
            s, best, tri = r["s"], r["best"], r["tri"]
            fp16 = min(r["cudnn"], tri[0]) if tri else r["cudnn"]
            b_ms = best[0] if best else float("nan")
            self.emit(f"| {r['idx']} | {s.name} {s.label()} | {s.count} | {best[1] if best else '-'} | {b_ms:.4f} | "
                      f"{r['ops'] / b_ms / 1e9:.1f} | {r['cudnn']:.4f} | {tri[0] if tri else float('nan'):.4f} | "
                      f"{b_ms / fp16:.2f} |")
            tot["int8"] += s.count * b_ms
            tot["cudnn"] += s.count * r["cudnn"]
            tot["tri"] += s.count * (tri[0] if tri else float("nan"))
            tot["fp16"] += s.count * fp16
        n = sum(r["s"].count for r in self.summary)
        self.emit()
        self.emit(f"Sum over the {n} convs these shapes stand for (each times its count): int8 best "
                  f"{tot['int8']:.3f} ms; cuDNN FP16 {tot['cudnn']:.3f} ms; Triton FP16 best {tot['tri']:.3f} ms; "
                  f"best FP16 per layer {tot['fp16']:.3f} ms; int8 / best FP16 = "
                  f"{tot['int8'] / tot['fp16'] if tot['fp16'] else float('nan'):.2f}")


if __name__ == "__main__":
    sys.exit(main())
