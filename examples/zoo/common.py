"""Shared layer-spec machinery for the sample models.

A model is described once as a :class:`NetSpec`: an ordered list of small layer
specs that name their input tensors.  From that one description we get

* a ``torch.nn.Module`` (:class:`SpecNet`) made of stock layers, used as the PyTorch
  peer in benchmarks, with deterministic kaiming-like random weights, and
* an ``onnx.ModelProto`` (:func:`to_onnx`) with exactly those weights, written with
  ``onnx.helper`` in the layout a PyTorch export would give (Conv, then a separate
  BatchNormalization node, then the activation).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

LEAKY_SLOPE = 0.1
BN_EPS = 1e-5
MIN_OPSET = 13


# --------------------------------------------------------------------------- layer specs
@dataclass(frozen=True)
class Conv:
    """Conv2d ("same" padding k//2) with optional BatchNorm and activation ('relu', 'leaky' or None).

    ``bn_gamma`` is the (low, high) range of the random BN scale; residual branches use a
    small one so that activations stay O(1) through many additions.
    """

    name: str
    src: str
    cin: int
    cout: int
    k: int
    stride: int = 1
    bias: bool = False
    bn: bool = True
    act: str | None = "relu"
    bn_gamma: tuple[float, float] = (0.8, 1.2)


@dataclass(frozen=True)
class Act:
    """Elementwise activation ('relu' or 'leaky')."""

    name: str
    src: str
    kind: str


@dataclass(frozen=True)
class Add:
    """Elementwise sum of two tensors."""

    name: str
    a: str
    b: str


@dataclass(frozen=True)
class MaxPool:
    """Max pooling with square kernel, stride and symmetric padding."""

    name: str
    src: str
    k: int
    stride: int
    pad: int = 0


@dataclass(frozen=True)
class Concat:
    """Channel concatenation."""

    name: str
    srcs: tuple[str, ...]


@dataclass(frozen=True)
class ChannelSlice:
    """Channels [start, end) of a tensor (ONNX Slice on axis 1)."""

    name: str
    src: str
    start: int
    end: int


@dataclass(frozen=True)
class Upsample:
    """Nearest-neighbour upsampling by an integer factor (ONNX Resize)."""

    name: str
    src: str
    scale: int


@dataclass(frozen=True)
class GlobalPool:
    """Global average pool followed by flatten: [N,C,H,W] -> [N,C]."""

    name: str
    src: str


@dataclass(frozen=True)
class Linear:
    """Fully connected layer (ONNX Gemm with transB=1)."""

    name: str
    src: str
    cin: int
    cout: int


Layer = Union[Conv, Act, Add, MaxPool, Concat, ChannelSlice, Upsample, GlobalPool, Linear]


@dataclass
class NetSpec:
    """A whole network: input (C, H, W), ordered layers, output tensor names and their shapes."""

    name: str
    input_name: str
    input_chw: tuple[int, int, int]
    layers: list[Layer] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    act: str = "relu"  # the nonlinearity that feeds most convs; sets the init gain
    calib_hw: tuple[int, int] | None = None  # input size for BN calibration (None: input_chw's)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per tensor, without batch


class SpecBuilder:
    """Appends layers to a :class:`NetSpec` while tracking every tensor's shape.

    Each method returns the name of the new tensor, which is also the layer's name.
    """

    def __init__(self, name: str, input_name: str, input_chw: tuple[int, int, int], act: str = "relu",
                 calib_hw: tuple[int, int] | None = None) -> None:
        self.spec = NetSpec(name, input_name, input_chw, act=act, calib_hw=calib_hw)
        self.spec.shapes[input_name] = input_chw

    def _add(self, layer: Layer, shape: tuple[int, ...]) -> str:
        if layer.name in self.spec.shapes:
            raise ValueError(f"duplicate tensor name '{layer.name}'")
        self.spec.layers.append(layer)
        self.spec.shapes[layer.name] = shape
        return layer.name

    def shape(self, t: str) -> tuple[int, ...]:
        """Shape (without batch) of a tensor already in the spec."""
        return self.spec.shapes[t]

    def conv(self, name: str, src: str, cout: int, k: int, stride: int = 1, *, bias: bool = False,
             bn: bool = True, act: str | None = "relu", bn_gamma: tuple[float, float] = (0.8, 1.2)) -> str:
        """Conv2d + optional BN + optional activation."""
        c, h, w = self.shape(src)
        p = k // 2
        oh, ow = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
        return self._add(Conv(name, src, c, cout, k, stride, bias, bn, act, bn_gamma), (cout, oh, ow))

    def act(self, name: str, src: str, kind: str) -> str:
        """Elementwise activation."""
        return self._add(Act(name, src, kind), self.shape(src))

    def add(self, name: str, a: str, b: str) -> str:
        """Elementwise sum."""
        if self.shape(a) != self.shape(b):
            raise ValueError(f"add '{name}': shapes {self.shape(a)} and {self.shape(b)} differ")
        return self._add(Add(name, a, b), self.shape(a))

    def maxpool(self, name: str, src: str, k: int, stride: int, pad: int = 0) -> str:
        """Max pooling."""
        c, h, w = self.shape(src)
        return self._add(MaxPool(name, src, k, stride, pad),
                         (c, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1))

    def concat(self, name: str, *srcs: str) -> str:
        """Concatenate along channels."""
        shapes = [self.shape(s) for s in srcs]
        if len({s[1:] for s in shapes}) != 1:
            raise ValueError(f"concat '{name}': spatial shapes differ: {shapes}")
        return self._add(Concat(name, tuple(srcs)), (sum(s[0] for s in shapes),) + shapes[0][1:])

    def channel_slice(self, name: str, src: str, start: int, end: int) -> str:
        """Channels [start, end)."""
        c, h, w = self.shape(src)
        if not 0 <= start < end <= c:
            raise ValueError(f"slice '{name}': [{start}, {end}) out of range for {c} channels")
        return self._add(ChannelSlice(name, src, start, end), (end - start, h, w))

    def upsample(self, name: str, src: str, scale: int) -> str:
        """Nearest upsampling."""
        c, h, w = self.shape(src)
        return self._add(Upsample(name, src, scale), (c, h * scale, w * scale))

    def global_pool(self, name: str, src: str) -> str:
        """Global average pool + flatten."""
        return self._add(GlobalPool(name, src), (self.shape(src)[0],))

    def linear(self, name: str, src: str, cout: int) -> str:
        """Fully connected layer on a flat [C] tensor."""
        (c,) = self.shape(src)
        return self._add(Linear(name, src, c, cout), (cout,))

    def finish(self, *outputs: str) -> NetSpec:
        """Mark the network outputs and return the spec."""
        for o in outputs:
            self.shape(o)
        self.spec.outputs = list(outputs)
        return self.spec


# --------------------------------------------------------------------------- torch side
def _act_module(kind: str | None) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "relu":
        return nn.ReLU(inplace=False)
    if kind == "leaky":
        return nn.LeakyReLU(LEAKY_SLOPE)
    raise ValueError(f"unknown activation '{kind}'")


class ConvBNAct(nn.Module):
    """Conv2d, BatchNorm2d (optional) and activation, as three stock layers."""

    def __init__(self, s: Conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(s.cin, s.cout, s.k, s.stride, s.k // 2, bias=s.bias)
        self.bn = nn.BatchNorm2d(s.cout, eps=BN_EPS) if s.bn else None
        self.act = _act_module(s.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


def _key(name: str) -> str:
    """Layer name -> ModuleDict / state_dict key (no dots allowed)."""
    return name.replace(".", "_")


class SpecNet(nn.Module):
    """A torch module that runs a :class:`NetSpec` layer by layer.

    Returns one tensor for a single-output spec, else a tuple in ``spec.outputs`` order.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        for s in spec.layers:
            if isinstance(s, Conv):
                self.layers[_key(s.name)] = ConvBNAct(s)
            elif isinstance(s, MaxPool):
                self.layers[_key(s.name)] = nn.MaxPool2d(s.k, s.stride, s.pad)
            elif isinstance(s, Act):
                self.layers[_key(s.name)] = _act_module(s.kind)
            elif isinstance(s, Upsample):
                self.layers[_key(s.name)] = nn.Upsample(scale_factor=s.scale, mode="nearest")
            elif isinstance(s, GlobalPool):
                self.layers[_key(s.name)] = nn.AdaptiveAvgPool2d(1)
            elif isinstance(s, Linear):
                self.layers[_key(s.name)] = nn.Linear(s.cin, s.cout)

    def step(self, s: Layer, env: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run one layer on the tensors in ``env`` and return its output."""
        if isinstance(s, Add):
            return env[s.a] + env[s.b]
        if isinstance(s, Concat):
            return torch.cat([env[t] for t in s.srcs], dim=1)
        if isinstance(s, ChannelSlice):
            return env[s.src][:, s.start:s.end]
        if isinstance(s, GlobalPool):
            return torch.flatten(self.layers[_key(s.name)](env[s.src]), 1)
        return self.layers[_key(s.name)](env[s.src])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor] = {self.spec.input_name: x}
        for s in self.spec.layers:
            env[s.name] = self.step(s, env)
        outs = tuple(env[o] for o in self.spec.outputs)
        return outs[0] if len(outs) == 1 else outs


def _gain(act: str | None) -> float:
    return {"relu": math.sqrt(2.0), "leaky": math.sqrt(2.0 / (1.0 + LEAKY_SLOPE ** 2)), None: 1.0}[act]


@torch.no_grad()
def init_weights(net: SpecNet, seed: int) -> None:
    """Deterministic kaiming-like random weights and non-trivial, realistic BN statistics.

    Conv / Linear weights ~ N(0, gain^2 / fan_in) with the kaiming gain of the spec's nonlinearity;
    biases and BN beta ~ N(0, 0.1^2); BN gamma ~ U(spec.bn_gamma).  BN running statistics are set
    as a trained network would have them, but off by a random amount: see :func:`_calibrate_bn`.
    Every draw comes from one generator seeded with ``seed``, in layer order, so the result does
    not depend on torch's global RNG.
    """
    g = torch.Generator().manual_seed(seed)
    gain = _gain(net.spec.act)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    def uniform(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float32)

    for s in net.spec.layers:
        if isinstance(s, Conv):
            m: ConvBNAct = net.layers[_key(s.name)]  # type: ignore[assignment]
            m.conv.weight.copy_(normal(tuple(m.conv.weight.shape), gain / math.sqrt(s.cin * s.k * s.k)))
            if m.conv.bias is not None:
                m.conv.bias.copy_(normal((s.cout,), 0.1))
            if m.bn is not None:
                m.bn.weight.copy_(uniform((s.cout,), *s.bn_gamma))
                m.bn.bias.copy_(normal((s.cout,), 0.1))
                # Perturbations, turned into statistics by _calibrate_bn below.
                m.bn.running_mean.copy_(normal((s.cout,), 0.2))
                m.bn.running_var.copy_(uniform((s.cout,), 0.6, 1.6))
        elif isinstance(s, Linear):
            lin: nn.Linear = net.layers[_key(s.name)]  # type: ignore[assignment]
            lin.weight.copy_(normal((s.cout, s.cin), gain / math.sqrt(s.cin)))
            lin.bias.copy_(normal((s.cout,), 0.1))
    c, h, w = net.spec.input_chw
    h, w = net.spec.calib_hw or (h, w)
    _calibrate_bn(net, torch.randn((1, c, h, w), generator=g, dtype=torch.float64))


@torch.no_grad()
def _calibrate_bn(net: SpecNet, x: torch.Tensor) -> None:
    """Set BN running statistics from one forward pass on ``x`` (float64, in layer order).

    On entry each BN holds perturbations (delta in running_mean, u in running_var); on exit
    running_mean = mu + delta * sigma and running_var = sigma^2 * u, where mu, sigma^2 are the
    channel statistics of the conv output.  Activations then stay O(1) through any depth, like in
    a trained network, while BN folding still sees non-trivial mean/var/gamma/beta.  float64 keeps
    the result reproducible across machines to well below float32 resolution.
    """
    ref = copy.deepcopy(net).double().eval()
    env: dict[str, torch.Tensor] = {net.spec.input_name: x}
    for s in net.spec.layers:
        if isinstance(s, Conv) and s.bn:
            m: ConvBNAct = ref.layers[_key(s.name)]  # type: ignore[assignment]
            y = m.conv(env[s.src])
            mu, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False) + 1e-3
            m.bn.running_mean.copy_(mu + m.bn.running_mean * var.sqrt())
            m.bn.running_var.copy_(var * m.bn.running_var)
            dst: ConvBNAct = net.layers[_key(s.name)]  # type: ignore[assignment]
            dst.bn.running_mean.copy_(m.bn.running_mean.float())
            dst.bn.running_var.copy_(m.bn.running_var.float())
            env[s.name] = m.act(m.bn(y))
        else:
            env[s.name] = ref.step(s, env)


def build_spec_net(spec: NetSpec, seed: int) -> SpecNet:
    """SpecNet with deterministic weights, in eval mode."""
    net = SpecNet(spec)
    init_weights(net, seed)
    return net.eval()


class NetCache:
    """Builds each (seed) network once; hands out copies so callers may modify theirs."""

    def __init__(self, make_spec: Callable[[], NetSpec], size: int = 2) -> None:
        self.make_spec = make_spec
        self.size = size
        self._nets: dict[int, SpecNet] = {}

    def shared(self, seed: int) -> SpecNet:
        """The cached network for ``seed`` (do not modify it)."""
        net = self._nets.pop(seed, None) or build_spec_net(self.make_spec(), seed)
        self._nets[seed] = net  # most recently used last
        while len(self._nets) > self.size:
            self._nets.pop(next(iter(self._nets)))
        return net

    def copy(self, seed: int) -> SpecNet:
        """A private copy of the network for ``seed``."""
        return copy.deepcopy(self.shared(seed))


# --------------------------------------------------------------------------- ONNX side
class _Emitter:
    """Collects nodes and initializers for one graph."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, arr: np.ndarray | torch.Tensor) -> str:
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().numpy()
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def _emit_act(e: _Emitter, kind: str, src: str, out: str, name: str) -> str:
    if kind == "relu":
        return e.node("Relu", [src], out, f"{name}/Relu")
    if kind == "leaky":
        return e.node("LeakyRelu", [src], out, f"{name}/LeakyRelu", alpha=LEAKY_SLOPE)
    raise ValueError(f"unknown activation '{kind}'")


def _emit_conv(e: _Emitter, s: Conv, m: ConvBNAct) -> None:
    key = _key(s.name)
    p = s.k // 2
    ins = [s.src, e.const(f"{key}.conv.weight", m.conv.weight)]
    if m.conv.bias is not None:
        ins.append(e.const(f"{key}.conv.bias", m.conv.bias))
    last = s.bn or s.act is not None
    t = e.node("Conv", ins, f"{s.name}/conv" if last else s.name, f"{s.name}/Conv",
               kernel_shape=[s.k, s.k], strides=[s.stride, s.stride], pads=[p, p, p, p],
               dilations=[1, 1], group=1)
    if m.bn is not None:
        bn = m.bn
        ins = [t] + [e.const(f"{key}.bn.{w}", getattr(bn, w)) for w in ("weight", "bias", "running_mean", "running_var")]
        t = e.node("BatchNormalization", ins, f"{s.name}/bn" if s.act else s.name, f"{s.name}/BatchNormalization",
                   epsilon=BN_EPS, momentum=0.9)
    if s.act is not None:
        _emit_act(e, s.act, t, s.name, s.name)


def to_onnx(spec: NetSpec, net: SpecNet, batch: int | str = 1, opset: int = 17) -> onnx.ModelProto:
    """Write ``spec`` with ``net``'s weights as an ONNX model.

    ``batch`` is a fixed size or a symbolic dimension name (e.g. ``"N"``).  Tensor names equal
    the spec's layer names; initializer names equal the torch state_dict keys.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported (need >= {MIN_OPSET})")
    e = _Emitter()
    for s in spec.layers:
        if isinstance(s, Conv):
            _emit_conv(e, s, net.layers[_key(s.name)])  # type: ignore[arg-type]
        elif isinstance(s, Act):
            _emit_act(e, s.kind, s.src, s.name, s.name)
        elif isinstance(s, Add):
            e.node("Add", [s.a, s.b], s.name, f"{s.name}/Add")
        elif isinstance(s, MaxPool):
            e.node("MaxPool", [s.src], s.name, f"{s.name}/MaxPool", kernel_shape=[s.k, s.k],
                   strides=[s.stride, s.stride], pads=[s.pad] * 4, ceil_mode=0)
        elif isinstance(s, Concat):
            e.node("Concat", list(s.srcs), s.name, f"{s.name}/Concat", axis=1)
        elif isinstance(s, ChannelSlice):
            k = _key(s.name)
            ins = [s.src, e.const(f"{k}.starts", np.array([s.start], np.int64)),
                   e.const(f"{k}.ends", np.array([s.end], np.int64)), e.const(f"{k}.axes", np.array([1], np.int64))]
            e.node("Slice", ins, s.name, f"{s.name}/Slice")
        elif isinstance(s, Upsample):
            scales = e.const(f"{_key(s.name)}.scales", np.array([1, 1, s.scale, s.scale], np.float32))
            e.node("Resize", [s.src, "", scales], s.name, f"{s.name}/Resize", mode="nearest",
                   coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        elif isinstance(s, GlobalPool):
            t = e.node("GlobalAveragePool", [s.src], f"{s.name}/pool", f"{s.name}/GlobalAveragePool")
            e.node("Flatten", [t], s.name, f"{s.name}/Flatten", axis=1)
        elif isinstance(s, Linear):
            lin: nn.Linear = net.layers[_key(s.name)]  # type: ignore[assignment]
            k = _key(s.name)
            e.node("Gemm", [s.src, e.const(f"{k}.weight", lin.weight), e.const(f"{k}.bias", lin.bias)],
                   s.name, f"{s.name}/Gemm", alpha=1.0, beta=1.0, transB=1)
        else:  # pragma: no cover - all Layer kinds handled above
            raise TypeError(f"unknown layer spec {s!r}")

    def vi(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *spec.shapes[name]])

    graph = helper.make_graph(e.nodes, spec.name, [vi(spec.input_name)], [vi(o) for o in spec.outputs], e.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="kiln-examples", producer_version="0.1")
    # The lowest IR version that carries this opset, so older runtimes can load the file too.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def param_count(net: nn.Module) -> int:
    """Number of trainable parameters (BN gamma/beta included, running stats not)."""
    return sum(p.numel() for p in net.parameters())
