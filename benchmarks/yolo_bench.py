#!/usr/bin/env python3
"""YOLOv4-tiny and YOLOv4 with Kiln against PyTorch: the network alone and the whole detection pipeline
(issue 15's GPU measurements).

    python benchmarks/yolo_bench.py [--models yolov4-tiny,yolov4] [--batches "yolov4-tiny:1;yolov4:1,32"]
                                    [--pipeline yolov4-tiny] [--device cuda|cpu] [--size N] [--runs 50]
                                    [--budget 540] [--opt-level 3] [--cache DIR] [--out FILE.md] [--json FILE]

Weights: random and seeded, the sample's (examples/yolo_pipeline.py): BN statistics from one forward pass on
its drawn test image, so activations stay in range however deep the network, and the yolo maps set so that
a few boxes pass the score threshold, one class per box. The .weights file is read back into
examples/darknet_torch.DarknetTorch (written apart from Kiln) for the PyTorch peers: both run the same weights.

1. Network only, per model and batch (input: letterboxed drawn images): Kiln's plan of the raw yolo maps (FP16
   on CUDA) against the same network in PyTorch FP16, channels_last, batch norm folded into the convolutions:
   eager, eager + CUDA graph and torch.compile(mode="reduce-overhead"), timed by scripts/gpu_check.py's bench()
   and peers_for() (median of --runs runs, CUDA events, each run from an idle GPU). Errors: Kiln and torch
   FP16 against torch FP32 (TF32 off), max|a - b| / max|b| over the maps.
2. Detection pipeline at batch 1 (--pipeline models), on the sample's 640x480 drawn test image: host letterbox
   of the uint8 image (the sample's code), upload from pinned memory, inference, download of the detections.
   Each stage is timed on the host (perf_counter; every stage ends synchronized), median of --runs runs.
   Kiln: one plan holding the network, YoloDecode and BatchedNMS, replayed as one CUDA graph (the sample's
   Detector). PyTorch: the network and a decode of the yolo maps written here (sigmoid/exp grid math) captured
   in one CUDA graph (or compiled, or eager), then torchvision.ops.batched_nms (a plain torch NMS written here
   where torchvision is missing: the table says which) and the download of the kept boxes. Each peer's
   detections are matched against Kiln's (equal counts, same classes, boxes within a tolerance).
   Score threshold 0.25, IoU 0.45, at most 100 detections, the best 4096 candidates (the sample's defaults).

Prints markdown tables with Kiln/peer ratios, the machine, versions, date and command; writes them (--out) and
the raw numbers (--json) only when asked. --budget: torch.compile peers are skipped once 70% of it has passed,
and rows not yet started once 90% has. --device cpu runs everything on the CPU in FP32 (for testing at small
--size): the torch peers run eager, without CUDA graph or torch.compile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (os.path.join(ROOT, "scripts"), HERE, ROOT):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

import torch  # noqa: E402

import gpu_check  # noqa: E402  (scripts/gpu_check.py: bench, peers_for, rel_err)
from examples import yolo_pipeline as yp  # noqa: E402
from examples.darknet_torch import DarknetTorch, fold_batchnorm, oracle_cfg, oracle_layers, read_weights  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from machine_load import LoadMeter  # noqa: E402

MODELS = {"yolov4-tiny": (os.path.join(ROOT, "examples", "yolov4_tiny", "yolov4-tiny.cfg"), 416),
          "yolov4": (os.path.join(ROOT, "examples", "yolov4", "yolov4.cfg"), 608)}
DEFAULT_BATCHES = "yolov4-tiny:1;yolov4:1,32"
CONF, IOU, MAX_DET, TOP_K = 0.25, 0.45, 100, 4096  # the sample's --conf, --iou, --max-det; BatchedNMS's top-k
TARGET = 0.8           # issue 15: Kiln <= 0.8x the faster peer (YOLOv4 FP16, network only)
COMPILE_SHARE, ROW_SHARE = 0.7, 0.9  # of --budget: no torch.compile after the first, no new row after the second
STAGES = ("preprocess", "upload", "inference", "download")
T0 = time.perf_counter()


class BenchError(Exception):
    """A bad option or environment: one line on stderr, exit status 2."""


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---- timing ------------------------------------------------------------------------------------------------

def device_ms(fn: Callable[[], Any], cuda: bool, runs: int) -> float:
    """Median ms of fn: on CUDA gpu_check.bench (CUDA events, idle GPU before each run), else perf_counter."""
    if cuda:
        return gpu_check.bench(fn, runs=runs)
    return host_ms(fn, cuda, runs)


def host_ms(fn: Callable[[], Any], cuda: bool, runs: int, warmup: int = 3) -> float:
    """Median ms of fn measured on the host (perf_counter), the GPU synchronized after each call."""
    return statistics.median(host_times(fn, cuda, runs, warmup))


def host_times(fn: Callable[[], Any], cuda: bool, runs: int, warmup: int = 3) -> list[float]:
    """The ms of each of `runs` calls of fn after `warmup` ones (perf_counter, the GPU synchronized after each)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def time_stages(stages: Sequence[tuple[str, Callable[[Any], Any]]], first: Any, runs: int, warmup: int,
                after: Callable[[dict[str, float]], None] | None = None) -> tuple[dict[str, float], Any]:
    """Run the chain of stages (each takes the previous one's result) warmup + runs times; returns the median ms
    of each stage and of their sum per run ("total"; its minimum "total_min"), and the last run's result. Every
    stage returns with its work done (synchronized). after(times): called after each timed run with its stage
    times (to add splits)."""
    samples: dict[str, list[float]] = {name: [] for name, _ in stages}
    samples["total"] = []
    out = None
    for k in range(warmup + runs):
        val, times = first, {}
        for name, fn in stages:
            t = time.perf_counter()
            val = fn(val)
            times[name] = (time.perf_counter() - t) * 1e3
        out = val
        if k >= warmup:
            for name, v in times.items():
                samples[name].append(v)
            samples["total"].append(sum(times.values()))
            if after is not None:
                after(times)
    return {**{name: statistics.median(v) for name, v in samples.items()}, "total_min": min(samples["total"])}, out


# ---- the models --------------------------------------------------------------------------------------------

@dataclass
class Head:
    """One [yolo] layer as the peer's decode reads it (from the .cfg, by examples.darknet_torch's parser)."""

    anchors: list[tuple[float, float]]
    classes: int
    scale_x_y: float


@dataclass
class Model:
    """A network of the bench: its .cfg (at the bench's input size), random weights and their arrays."""

    name: str
    cfg: str
    weights: str
    size: int
    layers: list[dict]
    params: dict
    heads: list[Head]


def heads_of(cfg: str) -> list[Head]:
    """The [yolo] layers' masked anchors, classes and scale_x_y, in .cfg order."""
    heads = []
    for s in oracle_cfg(cfg)[1:]:
        if s["type"] != "yolo":
            continue
        if int(s.get("new_coords", 0)):
            raise BenchError(f"{cfg}: new_coords=1 heads are not decoded by this bench")
        a = [float(v) for v in s["anchors"].split(",")]
        mask = [int(v) for v in s["mask"].split(",")]
        heads.append(Head([(a[2 * m], a[2 * m + 1]) for m in mask], int(s["classes"]), float(s.get("scale_x_y", 1.0))))
    return heads


def prepare(name: str, size: int, seed: int, work: str) -> Model:
    """The model's .cfg at `size` and its random weights (the sample's, written into `work` on first use)."""
    cfg0, _ = MODELS[name]
    cfg = yp.cfg_with_size(cfg0, size, work)
    image = yp.network_input(yp.letterbox(yp.draw_test_image(seed=seed), size, size)[0])
    weights = yp.random_weights_path(cfg, seed, image, work)
    layers = oracle_layers(oracle_cfg(cfg))
    return Model(name, cfg, weights, size, layers, read_weights(weights, layers), heads_of(cfg))


def images(m: Model, batch: int, seed: int) -> np.ndarray:
    """[batch, 3, S, S] float32: letterboxed drawn test images (seeds seed, seed + 1, ...). The network-only rows
    start at the weights' seed + 1: images other than the one the BN statistics came from, as in deployment."""
    return np.concatenate([yp.network_input(yp.letterbox(yp.draw_test_image(seed=seed + k), m.size, m.size)[0])
                           for k in range(batch)])


def peer_module(m: Model, device: str) -> torch.nn.Module:
    """The PyTorch peer: batch norm folded, FP16 channels_last on CUDA, FP32 on the CPU."""
    net = DarknetTorch(*fold_batchnorm(m.layers, m.params)).eval().to(device)
    if device == "cuda":
        net = net.half().to(memory_format=torch.channels_last)
    return net


def reference(m: Model, x: np.ndarray, device: str) -> list[np.ndarray]:
    """The raw maps in torch FP32 (batch norm as such, not folded; TF32 off)."""
    net = DarknetTorch(m.layers, m.params).eval().to(device)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            return [o.float().cpu().numpy() for o in net(torch.from_numpy(x).to(device))]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def worst_err(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    return max(gpu_check.rel_err(g, w) for g, w in zip(got, want))


# ---- Kiln ----------------------------------------------------------------------------------------------------

def build_kiln(m: Model, batch: int, detect: bool, args: argparse.Namespace, cache: str) -> tuple[Any, float]:
    """(Engine, build seconds) of the plan of m at `batch`: the raw yolo maps, or with detect decode + NMS."""
    from kiln.builder import Builder, BuilderConfig
    from kiln.frontend.darknet import load_darknet, parse_darknet_cfg
    from kiln.frontend.detect import append_detection
    from kiln.logger import Logger, Severity
    from kiln.runtime.engine import Engine
    logger = Logger(Severity.WARNING)
    t = time.perf_counter()
    graph = load_darknet(m.cfg, m.weights, logger, batch=batch)
    if detect:
        append_detection(graph, parse_darknet_cfg(m.cfg, logger).heads, conf=CONF, iou=IOU, max_det=MAX_DET,
                         pre_nms_top_k=TOP_K)
    plan = Builder(logger).build(graph, BuilderConfig(device=args.device, fp16=args.device == "cuda",
                                                      optimization_level=args.opt_level, timing_cache=cache))
    return Engine(plan), time.perf_counter() - t


def network_row(m: Model, batch: int, args: argparse.Namespace, cache: str, notes: list[str]) -> dict[str, Any]:
    """Kiln and the torch peers on the network alone at one batch."""
    cuda = args.device == "cuda"
    row: dict[str, Any] = {"model": m.name, "size": m.size, "batch": batch}
    x = images(m, batch, args.seed + 1)
    want = reference(m, x, args.device)
    try:
        eng, row["build_s"] = build_kiln(m, batch, False, args, cache)
        ctx = eng.create_execution_context()
        if cuda:
            xt = torch.from_numpy(x).cuda()
            outs = ctx.execute_async({"input": xt})
            torch.cuda.synchronize()
            row["kiln_err"] = worst_err([o.float().cpu().numpy() for o in outs.values()], want)
            row["graph"] = ctx.last_graph is not None
            buf = ctx.input_buffers().get("input")
            if buf is not None:  # zero copy: the input sits in the graph's static buffer (as gpu_check)
                buf.copy_(xt)
            feed = {"input": buf if buf is not None else xt}
            run: Callable[[], Any] = lambda: ctx.execute_async(feed)  # noqa: E731
        else:
            outs = ctx.execute({"input": x})
            row["kiln_err"] = worst_err([np.asarray(o) for o in outs.values()], want)
            run = lambda: ctx.execute({"input": x})  # noqa: E731
        row["kiln_ms"] = device_ms(run, cuda, args.runs)
        host = host_times(run, cuda, args.runs)  # as the pipeline's stages are timed
        row["kiln_host_ms"], row["kiln_host_min_ms"] = statistics.median(host), min(host)
        log(f"{m.name} b{batch}: Kiln {row['kiln_ms']:.3f} ms (host-timed {row['kiln_host_ms']:.3f}), build "
            f"{row['build_s']:.1f} s, error vs torch FP32 {row['kiln_err']:.1e}")
        del ctx, eng
    except Exception as e:  # one failing engine is a row's note, not the end of the run
        traceback.print_exc()
        notes.append(f"{m.name} b{batch}: Kiln failed: {type(e).__name__}: {str(e)[:200]}")
    try:
        net = peer_module(m, args.device)
        if cuda:
            x16 = torch.from_numpy(x).cuda().half().contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                row["torch16_err"] = worst_err([o.float().cpu().numpy() for o in net(x16)], want)
            compile_ok = time.perf_counter() - T0 < COMPILE_SHARE * args.budget
            if not compile_ok:
                notes.append(f"{m.name} b{batch}: torch.compile skipped (time budget)")
            try:
                peers = gpu_check.peers_for(net, x16, compile_ok)
            except Exception as e:  # torch.compile failing: the eager and CUDA graph peers are still timed
                if not compile_ok:
                    raise
                traceback.print_exc()
                notes.append(f"{m.name} b{batch}: torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
                torch.cuda.synchronize()
                peers = gpu_check.peers_for(net, x16, False)
            row.update(eager_ms=peers.get("eager"), graph_ms=peers.get("eager+graph"),
                       compile_ms=peers.get("torch.compile"), compile_s=peers.get("compile_s"))
        else:
            xt = torch.from_numpy(x)
            with torch.inference_mode():
                row["eager_ms"] = host_ms(lambda: net(xt), False, args.runs)
        log(f"{m.name} b{batch}: torch " + ", ".join(f"{k} {row[k]:.3f}" for k in ("eager_ms", "graph_ms", "compile_ms")
                                                   if row.get(k) is not None))
    except Exception as e:
        traceback.print_exc()
        notes.append(f"{m.name} b{batch}: peer failed: {type(e).__name__}: {str(e)[:200]}")
    fastest = [row[k] for k in ("graph_ms", "compile_ms") if row.get(k)] or ([row["eager_ms"]] if row.get("eager_ms")
                                                                              else [])
    if row.get("kiln_ms") and fastest:
        row["best_peer_ms"] = min(fastest)
        row["kiln_vs_best"] = row["kiln_ms"] / row["best_peer_ms"]
    return row


# ---- the PyTorch pipeline ----------------------------------------------------------------------------------

def nms_backend() -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor], str]:
    """(batched_nms(boxes, scores, classes, iou) -> kept indices by descending score, its name)."""
    try:
        from torchvision.ops import batched_nms
        import torchvision
        return batched_nms, f"torchvision.ops.batched_nms (torchvision {torchvision.__version__})"
    except Exception:  # torchvision missing, or its C++ ops not loadable beside this torch
        return plain_batched_nms, "plain torch greedy NMS (yolo_bench.plain_batched_nms: torchvision is missing)"


def plain_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Class-aware greedy NMS: indices of the kept boxes by descending score; a box is dropped when a kept box
    of its class overlaps it with IoU > iou (as torchvision.ops.batched_nms)."""
    order = torch.argsort(scores, descending=True, stable=True)
    b, c = boxes[order].float(), classes[order]
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    wh = (torch.minimum(b[:, None, 2:], b[None, :, 2:]) - torch.maximum(b[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    over = ((inter / (area[:, None] + area[None, :] - inter)) > iou) & (c[:, None] == c[None, :])  # NaN: False
    over_h = over.cpu().numpy()
    removed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= over_h[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


class TorchDecode(torch.nn.Module):
    """The network, then every yolo map decoded (Darknet's formulas) into boxes [N, B, 4] (x1, y1, x2, y2 in
    original-image pixels: the letterbox [N, 4] = scale_x, scale_y, pad_x, pad_y undone) and scores [N, B, C]
    (objectness x class probability) in float32; rows per head anchor-major, then y, then x."""

    def __init__(self, net: torch.nn.Module, heads: list[Head], size: int, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.heads, self.size, self.dtype = net, heads, size, dtype
        self.channels_last = device == "cuda"
        for k, h in enumerate(heads):  # made once: a host-to-device copy inside a captured run would break it
            self.register_buffer(f"anchors{k}", torch.tensor(h.anchors, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor, lb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        maps = self.net(x)
        sx, sy, px, py = (v.reshape(-1, 1, 1, 1) for v in lb.unbind(1))
        boxes, scores = [], []
        for k, (t, h) in enumerate(zip(maps, self.heads)):
            n, _, gh, gw = t.shape
            a = len(h.anchors)
            t = t.float().reshape(n, a, 5 + h.classes, gh, gw)
            gy = torch.arange(gh, device=t.device, dtype=torch.float32).reshape(1, 1, gh, 1)
            gx = torch.arange(gw, device=t.device, dtype=torch.float32).reshape(1, 1, 1, gw)
            anc = getattr(self, f"anchors{k}")
            s = h.scale_x_y
            cx = (torch.sigmoid(t[:, :, 0]) * s - 0.5 * (s - 1) + gx) * (self.size / gw)
            cy = (torch.sigmoid(t[:, :, 1]) * s - 0.5 * (s - 1) + gy) * (self.size / gh)
            bw = torch.exp(t[:, :, 2]) * anc[:, 0].reshape(1, a, 1, 1)
            bh = torch.exp(t[:, :, 3]) * anc[:, 1].reshape(1, a, 1, 1)
            xy = torch.stack([(cx - bw / 2 - px) / sx, (cy - bh / 2 - py) / sy,
                              (cx + bw / 2 - px) / sx, (cy + bh / 2 - py) / sy], -1)
            boxes.append(xy.reshape(n, a * gh * gw, 4))
            p = torch.sigmoid(t[:, :, 4:])
            scores.append((p[:, :, :1] * p[:, :, 1:]).permute(0, 1, 3, 4, 2).reshape(n, a * gh * gw, h.classes))
        return torch.cat(boxes, 1), torch.cat(scores, 1)


def select(boxes: torch.Tensor, scores: torch.Tensor, nms: Callable[..., torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's detections from boxes [B, 4] and scores [B, C]: (box, class) candidates above CONF, the best
    TOP_K of them, class-aware NMS, the first MAX_DET kept."""
    b, c = torch.nonzero(scores > CONF, as_tuple=True)
    s = scores[b, c]
    if s.numel() > TOP_K:
        s, order = torch.topk(s, TOP_K)
        b, c = b[order], c[order]
    keep = nms(boxes[b], s, c, IOU)[:MAX_DET]
    return boxes[b[keep]], s[keep], c[keep]


class TorchPipeline:
    """The PyTorch detection pipeline's stages: preprocess (the sample's letterbox), upload (pinned memory into
    static device buffers), inference (network + decode as one CUDA graph, torch.compile or eager; then NMS),
    download. mode: "graph", "compile" or "eager"."""

    def __init__(self, m: Model, net: torch.nn.Module, device: str, mode: str,
                 nms: Callable[..., torch.Tensor]) -> None:
        self.cuda, self.mode, self.nms, self.size = device == "cuda", mode, nms, m.size
        self.fn = TorchDecode(net, m.heads, m.size, device, torch.float16 if self.cuda else torch.float32)
        self.x = torch.zeros((1, 3, m.size, m.size), device=device)
        self.lb = torch.tensor([[1.0, 1.0, 0.0, 0.0]], device=device)
        self.net_ms: list[float] = []  # the network + decode part of each inference (CUDA events)
        self._ev: tuple[Any, Any] | None = None
        self.graph: Any = None
        if self.cuda:
            self.pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in
                           (("input", self.x), ("letterbox", self.lb))}
        with torch.inference_mode():
            if mode == "compile":
                self.fn = torch.compile(self.fn, mode="reduce-overhead", dynamic=False)
                for _ in range(3):
                    self.fn(self.x, self.lb)
            elif mode == "graph":
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        self.fn(self.x, self.lb)
                torch.cuda.current_stream().wait_stream(s)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = self.fn(self.x, self.lb)
        if self.cuda:
            torch.cuda.synchronize()

    def preprocess(self, img: Any) -> tuple[np.ndarray, np.ndarray]:
        canvas, lb = yp.letterbox(img, self.size, self.size)
        return yp.network_input(canvas), lb[None]

    def upload(self, xl: tuple[np.ndarray, np.ndarray]) -> None:
        x, lb = xl
        if not self.cuda:
            self.x, self.lb = torch.from_numpy(x), torch.from_numpy(lb)
            return
        for host, pin, dst in ((x, self.pinned["input"], self.x), (lb, self.pinned["letterbox"], self.lb)):
            pin.copy_(torch.from_numpy(host))
            dst.copy_(pin, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def infer(self, _: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            if self.graph is not None:
                self.graph.replay()
                boxes, scores = self.out
            else:
                boxes, scores = self.fn(self.x, self.lb)
            if self.cuda:
                b.record()
                self._ev = (a, b)
            dets = select(boxes[0], scores[0], self.nms)
            if self.cuda:
                torch.cuda.current_stream().synchronize()
        return dets

    def download(self, dets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> yp.Detections:
        boxes, scores, classes = (t.cpu().numpy() for t in dets)
        return yp.Detections(boxes.astype(np.float64), scores.astype(np.float64), classes.astype(np.int64))

    def split(self, times: dict[str, float]) -> None:
        """After a timed run: the network + decode share of its inference (CUDA events; the CPU: not split)."""
        if self._ev is not None:
            self.net_ms.append(self._ev[0].elapsed_time(self._ev[1]))


def match(kiln: yp.Detections, peer: yp.Detections, tol: float) -> dict[str, Any]:
    """Kiln's detections against a peer's: each Kiln detection, best score first, takes the free peer detection
    of its class with the nearest box; it matches when every coordinate is within tol pixels."""
    free = np.ones(len(peer.scores), bool)
    matched, box_diff, score_diff = 0, 0.0, 0.0
    for b, s, c in zip(kiln.boxes, kiln.scores, kiln.classes):
        cand = np.nonzero(free & (peer.classes == c))[0]
        if not len(cand):
            continue
        d = np.abs(peer.boxes[cand] - b).max(axis=1)
        j = cand[int(np.argmin(d))]
        if d.min() <= tol:
            free[j] = False
            matched += 1
            box_diff = max(box_diff, float(d.min()))
            score_diff = max(score_diff, abs(float(peer.scores[j]) - float(s)))
    n, k = len(kiln.scores), len(peer.scores)
    return {"kiln_dets": n, "peer_dets": k, "matched": matched, "max_box_diff_px": box_diff,
            "max_score_diff": score_diff, "agree": n == k == matched, "tol_px": tol}


def pipeline_rows(m: Model, args: argparse.Namespace, cache: str, notes: list[str]) -> list[dict[str, Any]]:
    """Kiln's detection pipeline and the PyTorch ones at batch 1 on the sample's drawn test image."""
    cuda = args.device == "cuda"
    img = yp.draw_test_image(seed=args.seed)
    warmup = 10 if cuda else 2
    rows: list[dict[str, Any]] = []
    kiln: dict[str, Any] | None = None
    try:
        eng, build_s = build_kiln(m, 1, True, args, cache)
        det = yp.Detector(eng)
        stages = [("preprocess", det.preprocess), ("upload", lambda xl: det.upload(*xl)), ("inference", det.infer),
                  ("download", lambda outs: yp.Detections.of(det.download(outs)))]
        med, kiln_dets = time_stages(stages, img, args.runs, warmup)
        kiln = {"model": m.name, "size": m.size, "engine": "Kiln", "what": "plan: network + YoloDecode + "
                "BatchedNMS, " + det.graph_note, "build_s": build_s, **{f"{k}_ms": v for k, v in med.items()},
                "detections": len(kiln_dets.scores)}
        rows.append(kiln)
        log(f"{m.name} pipeline: Kiln total {med['total']:.3f} ms (" + ", ".join(f"{k} {med[k]:.3f}" for k in STAGES)
            + f"), {len(kiln_dets.scores)} detections")
        del det, eng
    except Exception as e:  # the peers are still timed
        traceback.print_exc()
        notes.append(f"{m.name} pipeline: Kiln failed: {type(e).__name__}: {str(e)[:200]}")
    nms, nms_name = nms_backend()
    net = peer_module(m, args.device)
    modes = ["graph", "compile", "eager"] if cuda else ["eager"]
    what = {"graph": "PyTorch eager + CUDA graph (network + decode), then ",
            "compile": "torch.compile reduce-overhead (network + decode), then ",
            "eager": "PyTorch eager (network + decode), then "}
    tol = (0.01 if cuda else 1e-4) * max(img.size)  # of the image's longer side (FP16 maps on CUDA, FP32 on the CPU)
    for mode in modes:
        if mode == "compile" and time.perf_counter() - T0 > COMPILE_SHARE * args.budget:
            notes.append(f"{m.name} pipeline: torch.compile peer skipped (time budget)")
            continue
        try:
            t = time.perf_counter()
            pipe = TorchPipeline(m, net, args.device, mode, nms)
            setup_s = time.perf_counter() - t
            stages = [("preprocess", pipe.preprocess), ("upload", pipe.upload), ("inference", pipe.infer),
                      ("download", pipe.download)]
            med, dets = time_stages(stages, img, args.runs, warmup, after=pipe.split)
            row = {"model": m.name, "size": m.size, "engine": f"torch {mode}", "what": what[mode] + nms_name,
                   "setup_s": setup_s, **{f"{k}_ms": v for k, v in med.items()}, "detections": len(dets.scores),
                   "nms": nms_name}
            if pipe.net_ms:
                row["network_decode_ms"] = statistics.median(pipe.net_ms)
            if kiln is not None:
                row.update(match(kiln_dets, dets, tol))
                row["kiln_vs_total"] = kiln["total_ms"] / row["total_ms"]
                dev_part = [sum(r[f"{k}_ms"] for k in ("upload", "inference", "download")) for r in (kiln, row)]
                row["kiln_vs_device_part"] = dev_part[0] / dev_part[1]
            rows.append(row)
            log(f"{m.name} pipeline: torch {mode} total {med['total']:.3f} ms, {len(dets.scores)} detections"
                + (f", agree with Kiln: {row['agree']} (max box diff {row['max_box_diff_px']:.3g} px)"
                   if "agree" in row else ""))
            del pipe
        except Exception as e:
            traceback.print_exc()
            notes.append(f"{m.name} pipeline, torch {mode}: failed: {type(e).__name__}: {str(e)[:200]}")
    return rows


# ---- report -------------------------------------------------------------------------------------------------

def machine(device: str) -> dict[str, str]:
    """benchmarks/zoo.py's machine description (CPU, ISA, cores, versions, Kiln revision, GPU), plus Triton."""
    import zoo
    info = zoo.machine(device)
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "absent"
    return info


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(res: dict[str, Any]) -> str:
    """The markdown report of a run."""
    mach, args = res["machine"], res["args"]
    cuda = args["device"] == "cuda"
    dev = mach.get("gpu") or f"CPU {mach['cpu']}"
    timing = ("CUDA events from an idle GPU (scripts/gpu_check.py's bench)" if cuda else
              "perf_counter on the CPU; the CPU has no CUDA graph, and torch.compile is not timed there")
    lines = [f"# Kiln YOLO benchmark ({dev})", "",
             f"Command: `{res['command']}`", "",
             f"Date: {mach['date']}. Machine: {mach['cpu']} ({mach['cores']} cores)"
             + (f"; GPU {mach['gpu']}." if "gpu" in mach else "."),
             f"Versions: kiln {mach['kiln']}, torch {mach['torch']}, torchvision {mach['torchvision']}, "
             f"Triton {mach['triton']}, onnx {mach['onnx']}, onnxruntime {mach['onnxruntime']}, "
             f"Python {mach['python']}.",
             f"Settings: device {args['device']}, {'FP16' if args['device'] == 'cuda' else 'FP32'}, Kiln optimization "
             f"level {args['opt_level']}, median of {args['runs']} runs; random weights (seed {args['seed']}); "
             f"{res['load']}.", "",
             "## Network only (raw yolo maps)", "",
             f"Kiln and PyTorch peers ({'FP16, channels_last' if cuda else 'FP32'}, batch norm folded) on the same "
             f"weights and inputs; {timing}. Errors: max|a-b|/max|b| against torch FP32 (TF32 off). Kiln/best: "
             "against the faster of eager + CUDA graph and torch.compile (eager where neither ran); issue 15's "
             f"target <= {TARGET}.", "",
             "| model | input | batch | Kiln ms | eager ms | eager+graph ms | compile ms | Kiln/eager | Kiln/graph "
             "| Kiln/compile | Kiln/best | Kiln err | torch FP16 err | Kiln build s | compile s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["network"]:
        k = r.get("kiln_ms")
        ratio = (lambda p: _f(k / r[p], "{:.2f}") if k and r.get(p) else "-")
        best = _f(r.get("kiln_vs_best"), "{:.2f}")
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {_f(k)} | {_f(r.get('eager_ms'))} "
                     f"| {_f(r.get('graph_ms'))} | {_f(r.get('compile_ms'))} | {ratio('eager_ms')} "
                     f"| {ratio('graph_ms')} "
                     f"| {ratio('compile_ms')} | {best} | {_f(r.get('kiln_err'), '{:.1e}')} "
                     f"| {_f(r.get('torch16_err'), '{:.1e}')} | {_f(r.get('build_s'), '{:.1f}')} "
                     f"| {_f(r.get('compile_s'), '{:.1f}')} |")
    if res["pipeline"]:
        lines += ["", "## Detection pipeline, batch 1", "",
                  "The sample's 640x480 drawn test image: letterbox on the host (Pillow), upload (pinned), inference, "
                  "download of the detections; host-timed stages (each ends synchronized), medians; total = median of "
                  "per-run sums. Device part = upload + inference + download (the letterbox is the same code on both "
                  f"sides). Score > {CONF}, NMS IoU {IOU}, at most {MAX_DET}, best {TOP_K} candidates.", "",
                  "| model | engine | preprocess ms | upload ms | inference ms | download ms | total ms "
                  "| Kiln/this total | Kiln/this device part | detections | agree with Kiln (max box diff px) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["pipeline"]:
            agree = "-" if "agree" not in r else (f"{'yes' if r['agree'] else 'NO'}: {r['matched']}/{r['kiln_dets']} "
                                                  f"matched ({r['max_box_diff_px']:.2g})")
            lines.append(f"| {r['model']} | {r['engine']} | {_f(r['preprocess_ms'])} | {_f(r['upload_ms'])} "
                         f"| {_f(r['inference_ms'])} | {_f(r['download_ms'])} | {_f(r['total_ms'])} "
                         f"| {_f(r.get('kiln_vs_total'), '{:.2f}')} | {_f(r.get('kiln_vs_device_part'), '{:.2f}')} "
                         f"| {r['detections']} | {agree} |")
        lines.append("")
        for r in res["pipeline"]:
            lines.append(f"- {r['model']} {r['engine']}: {r['what']}"
                         + (f"; network + decode {r['network_decode_ms']:.3f} ms of its inference (CUDA events)"
                            if "network_decode_ms" in r else "")
                         + (f"; Kiln build {r['build_s']:.1f} s" if "build_s" in r else "")
                         + (f"; setup (capture/compile) {r['setup_s']:.1f} s" if "setup_s" in r else ""))
        for r in res["pipeline"]:
            if r["engine"] != "Kiln":
                continue
            net = next((n for n in res["network"] if n["model"] == r["model"] and n["batch"] == 1
                        and n.get("kiln_ms")), None)
            if net:
                lines.append(f"- {r['model']}: Kiln pipeline total {r['total_ms']:.3f} ms beside Kiln network only "
                             f"{net['kiln_ms']:.3f} ms ({'CUDA events' if cuda else 'perf_counter'}; "
                             f"{net['kiln_host_ms']:.3f} ms host-timed as the pipeline's stages)")
    lines.append("")
    lines += [f"- {n}" for n in res["notes"]]
    lines.append(f"- total wall time {res['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


# ---- main ---------------------------------------------------------------------------------------------------

def parse_batches(spec: str, models: list[str]) -> dict[str, list[int]]:
    """'1,32' (every model) or 'yolov4-tiny:1;yolov4:1,32' -> {model: batches}."""
    def ints(text: str) -> list[int]:
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise BenchError(f"--batches: '{text}' is not a comma-separated list of batch sizes") from None
        if not vals or any(v < 1 for v in vals):
            raise BenchError(f"--batches: '{text}' needs batch sizes >= 1")
        return vals
    if ":" not in spec:
        return {m: ints(spec) for m in models}
    out: dict[str, list[int]] = {m: [] for m in models}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, bs = part.partition(":")
        if name.strip() not in MODELS:
            raise BenchError(f"--batches: unknown model '{name.strip()}' (known: {', '.join(MODELS)})")
        if name.strip() in out:
            out[name.strip()] = ints(bs)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
    ap.add_argument("--batches", default=DEFAULT_BATCHES, help="network-only batches: '1,32' for every model or "
                    "per model (default: %(default)s)")
    ap.add_argument("--pipeline", default="yolov4-tiny", help="models whose detection pipeline is timed at batch 1, "
                    "comma-separated, or 'none' (default: %(default)s)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, help="input size of every model, a multiple of 32 (default: yolov4-tiny "
                    "416, yolov4 608)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per measurement (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=540, help="seconds: no torch.compile past 70%%, no new row past "
                    "90%% (default: %(default)s)")
    ap.add_argument("--opt-level", type=int, default=3, help="Kiln optimization level (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the drawn images")
    ap.add_argument("--cache", help="folder kept between runs for the .cfg copies, weights and the Kiln timing "
                    "cache (default: a temporary folder, removed at the end)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--json", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.model_list:
        if m not in MODELS:
            raise BenchError(f"--models: unknown model '{m}' (known: {', '.join(MODELS)})")
    if not args.model_list:
        raise BenchError("--models names no model")
    args.pipeline_list = [] if args.pipeline == "none" else [m.strip() for m in args.pipeline.split(",") if m.strip()]
    for m in args.pipeline_list:
        if m not in args.model_list:
            raise BenchError(f"--pipeline: '{m}' is not among --models ({', '.join(args.model_list)})")
    args.batch_map = parse_batches(args.batches, args.model_list)
    if args.size is not None and (args.size < 32 or args.size % 32):
        raise BenchError(f"--size must be a positive multiple of 32, got {args.size}")
    if args.runs < 1:
        raise BenchError(f"--runs must be >= 1, got {args.runs}")
    if args.opt_level < 0:
        raise BenchError(f"--opt-level must be >= 0, got {args.opt_level}")
    if not args.budget > 0:
        raise BenchError(f"--budget must be > 0 seconds, got {args.budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    from kiln.fileio import check_writable
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path:
            check_writable(path, f"{flag} file")
    if args.cache and os.path.exists(args.cache) and not os.path.isdir(args.cache):
        raise BenchError(f"--cache {args.cache}: not a folder")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every measurement the options ask for; the results as a dict (machine, args, network, pipeline, notes)."""
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)
        work, tmp = args.cache, None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kiln-yolo-bench-")
        work = tmp.name
    cache = os.path.join(work, "timing_cache.json")
    meter = LoadMeter("the runs")
    meter.sample_before()
    res: dict[str, Any] = {"command": "python benchmarks/yolo_bench.py " + " ".join(argv),
                           "machine": machine(args.device), "network": [], "pipeline": [], "notes": [],
                           "args": {k: getattr(args, k) for k in ("device", "opt_level", "runs", "seed", "budget")}}
    nms_name = nms_backend()[1]
    if args.pipeline_list:
        res["nms"] = nms_name
    log(f"{res['machine'].get('gpu') or res['machine']['cpu']}; torch {torch.__version__}; NMS: {nms_name}")
    try:
        with meter.measure():
            for name in args.model_list:
                size = args.size or MODELS[name][1]
                t = time.perf_counter()
                m = prepare(name, size, args.seed, work)
                res.setdefault("models", {})[name] = {"cfg": m.cfg, "weights": m.weights, "size": size}
                log(f"{name} {size}x{size}: weights ready ({time.perf_counter() - t:.1f} s)")
                for batch in args.batch_map.get(name, []):
                    if time.perf_counter() - T0 > ROW_SHARE * args.budget:
                        res["notes"].append(f"{name} b{batch}: not run (time budget)")
                        continue
                    res["network"].append(network_row(m, batch, args, cache, res["notes"]))
                    partial(res, args)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
                if name in args.pipeline_list:
                    if time.perf_counter() - T0 > ROW_SHARE * args.budget:
                        res["notes"].append(f"{name} pipeline: not run (time budget)")
                    else:
                        res["pipeline"] += pipeline_rows(m, args, cache, res["notes"])
                        partial(res, args)
    finally:
        res["load"] = meter.describe()
        res["wall_s"] = time.perf_counter() - T0
        if tmp is not None:
            tmp.cleanup()
    return res


def partial(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Write what there is so far (a run cut short by a time limit still leaves its tables)."""
    res.setdefault("load", "load measured at the end")
    res["wall_s"] = time.perf_counter() - T0
    write(res, args)


def write(res: dict[str, Any], args: argparse.Namespace) -> None:
    from kiln.fileio import atomic_write
    if args.out:
        atomic_write(args.out, render(res).encode(), "report")
    if args.json:
        atomic_write(args.json, json.dumps(res, indent=1, default=str).encode(), "JSON results")


def main(argv: Sequence[str] | None = None) -> int:
    global T0
    T0 = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        res = run(args, argv)
        print(render(res))
        write(res, args)
    except (BenchError, KilnError, yp.SampleError) as e:
        print(f"yolo_bench: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
