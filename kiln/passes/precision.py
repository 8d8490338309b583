"""Reduced precision: run layers that tolerate it in float16/bfloat16, the rest in float32.

The builder runs this after the optimization pipeline when `fp16` or `bf16` is set. Each node whose
op is in the target's low-precision set (`low_precision_ops`: `LOW_PRECISION_OPS`, less `CPU_FP32_OPS` on
the CPU) and not named in `fp32_layers` computes in the low type: its float32
constant inputs (weights) are converted once, its float32 activation inputs get a Cast. Nodes outside
the list keep float32 and get a Cast back where they read a low-precision value. Casts are inserted
only where the element type changes and are shared by all readers of a value. Graph inputs and
outputs keep their declared element types (a Cast sits at each boundary that needs one).

On the CPU target the builder lowers only where the CPU computes the type natively
(kiln.backends.cpu.features: bfloat16 with AVX512-BF16 / AMX-BF16, never float16); elsewhere it warns and
builds float32 (`cpu_precision`).

If/Loop/Scan bodies are lowered the same way when the pass runs under `PassManager(subgraphs=True)` (each
body after the graph holding it). A body's interface keeps its element types: its inputs (Loop/Scan
iteration values, loop-carried state) and outputs get Casts inside the body at entry and exit, so a
loop-carried value has one type across iterations. A captured outer value is read in the type the
enclosing graph's lowering gave it; a body layer that stays float32 reads a low capture through a Cast
inside the body.
"""
from __future__ import annotations

from typing import Iterable

from kiln.ir.dtype import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import TensorType
from kiln.logger import Logger
from kiln.passes.base import Pass, PassContext

LOW_PRECISION_OPS: frozenset[str] = frozenset({
    # compute layers
    "Conv", "ConvTranspose", "FusedConv", "FusedConvTranspose", "FusedGemm", "Gemm", "MatMul", "Pointwise",
    # elementwise and activations
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Max", "Min", "Sum", "Mean", "Where", "Relu", "LeakyRelu",
    "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu", "Celu", "Gelu", "Mish",
    "Softplus", "Softsign", "ThresholdedRelu", "Erf", "Identity", "Dropout",
    # pooling, resampling, data movement
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample",
    "Concat", "Split", "Slice", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Pad", "Tile",
    "Expand", "Gather", "GatherElements", "GatherND", "DepthToSpace", "SpaceToDepth", "BatchNormalization",
    # reductions that cannot overflow (torch accumulates the mean in float32)
    "ReduceMean", "ReduceMax", "ReduceMin",
    # normalization whose statistics every kernel keeps in float32 (stash_type 1: the reference and
    # cuda.triton_layernorm compute mean and variance in float32 and round the result once)
    "LayerNormalization", "RMSNormalization", "AddLayerNormalization",
    # a depthwise conv with its channel LayerNorm (CUDA only): float32 accumulation and statistics in the kernel
    "FusedConvNorm",
    # squeeze-excite gates: the reference and cuda.triton_se_gate keep the mean, both products and the
    # activations in float32 and round the gate once (kiln.ops.squeeze_excite)
    "SEGate",
    # channel shuffles: pure data movement (kiln.ops.shuffle)
    "ChannelShuffle",
    # fused attention: every kernel keeps the softmax statistics and the accumulation in float32 (the fused
    # layers carry softmax_precision 1, so the reference does too)
    "Attention",
})
"""Ops that run in float16/bfloat16. Sums, other normalizations with statistics, softmax, exp/log/pow and
everything else stay float32 (they accumulate or overflow)."""

CPU_FP32_OPS: frozenset[str] = frozenset({"ChannelShuffle", "RMSNormalization", "AddLayerNormalization"})
"""Ops of LOW_PRECISION_OPS that stay float32 on the CPU target: their fast CPU tactics are C kernels of
float32 only (cpu.channel_shuffle, cpu.rmsnorm_c; AddLayerNormalization is made for the CUDA target only), so
a bfloat16 layer would run the reference (SEGate has cpu.se_gate_bf16: a bfloat16 map's mean, then the
float32 kernel). Every other
op there has a CPU tactic taking bfloat16 where its float32 layer has one (oneDNN's bf16 convolutions,
inner products and pools; Pointwise programs as torch ops; LayerNormalization, Resize, Concat, Attention
through aten) or runs the reference in float32 too (data movement)."""


def low_precision_ops(device: str) -> frozenset[str]:
    """The ops that run in the low type on a target device ("cpu", "cuda"): the one place deciding it."""
    return LOW_PRECISION_OPS - CPU_FP32_OPS if device == "cpu" else LOW_PRECISION_OPS


FP32_POINTWISE_OPS: frozenset[str] = frozenset({"Exp", "Log", "Pow", "Reciprocal", "Cast", "Softmax"})
"""A Pointwise program using one of these stays float32."""


def _casts_to_bool(ins: dict) -> bool:
    """A program's Cast to bool: its result is the same in any float type (x != 0), so it needs no float32."""
    return ins.get("op") == "Cast" and (ins.get("attrs") or {}).get("to") == DType.BOOL.onnx


NEUTRAL_OPS: frozenset[str] = frozenset({"Cast", "Shape", "Size"})
"""Ops that read any element type as is: no Cast is inserted in front of them."""


INDEX_OUTPUTS: frozenset[str] = frozenset({"Dropout", "MaxPool"})
"""Ops of the list above whose outputs after the first are not data (a mask, indices)."""


def _retype(n: Node, logger: Logger | None = None, known_only: bool = True) -> None:
    """n's output types re-inferred from its (possibly just cast) inputs, so that the decisions for the nodes
    after it see the element types they will really get (`known_only`: only where inference tells the type)."""
    from kiln.ops.infer import infer_node, merge_types
    for o, t in zip(n.outputs, infer_node(n, logger)):
        if t.dtype is not None or not known_only:
            o.type = merge_types(t, o.type)


def _infer_flat(g: Graph, logger: Logger) -> None:
    """Every node output of g re-inferred, without entering bodies: those are lowered after g, and until then
    their declared output types (which If/Loop/Scan outputs follow) must stay as they were."""
    for n in g.nodes:
        _retype(n, logger, known_only=False)


def _redirect_readers(g: Graph, old: Value, new: Value) -> None:
    """Every reader of `old` in g (nodes, subgraph captures, at any depth) reads `new`; g's outputs stay."""
    outputs = list(g.outputs)
    g.replace_uses(old, new)
    g.outputs = outputs


def _is_float32(v: Value | None) -> bool:
    return v is not None and v.kind == "tensor" and v.type.dtype == DType.FLOAT32


class ReducedPrecision(Pass):
    """Casts float32 layers to `dtype` (FLOAT16 or BFLOAT16) with per-layer fallback to float32.

    One instance lowers a graph and then its bodies (PassManager(subgraphs=True)); it remembers the values it
    made low and their types before, so a body knows which of its captures hold the low type because of this
    lowering, and which type a body output that is such a capture had."""

    name = "reduced_precision"

    def __init__(self, dtype: DType, fp32_layers: Iterable[str] = (),
                 ops: frozenset[str] = LOW_PRECISION_OPS) -> None:
        """ops: the op types that may run low (`low_precision_ops(device)` for a target)."""
        if dtype not in (DType.FLOAT16, DType.BFLOAT16):
            raise ValueError(f"reduced precision must be float16 or bfloat16, not {dtype.value}")
        self.dtype = dtype
        self.fp32_layers = set(fp32_layers)
        self.ops = ops
        # values this pass lowered -> their element type before (keys kept alive: no id reuse)
        self._made_low: dict[Value, DType | None] = {}

    # -- decisions --------------------------------------------------------------------------------
    def runs_low(self, n: Node) -> bool:
        """Whether node `n` computes in the low type."""
        if n.domain not in ("", "ai.onnx", "kiln") or n.op_type not in self.ops:
            return False
        if n.name in self.fp32_layers or n.subgraphs():
            return False
        if n.op_type == "Pointwise":
            prog = n.attr("program", None) or []
            if any(ins.get("op") in FP32_POINTWISE_OPS and not _casts_to_bool(ins) for ins in prog) \
                    or len(n.attr("outputs", None) or [1]) != 1:
                return False
        cast_idx = self._cast_indices(n)
        if not cast_idx:
            return False
        for i in cast_idx:
            dt = n.inputs[i].type.dtype  # type: ignore[union-attr]
            if dt not in (DType.FLOAT32, self.dtype):
                return False
        return True

    @staticmethod
    def _cast_indices(n: Node) -> list[int]:
        """Inputs that carry float data (not host values like shapes/scales)."""
        from kiln.ops.registry import lookup
        try:
            value_inputs = set(lookup(n.op_type, n.domain).value_inputs)
        except Exception:
            return []
        out = []
        for i, v in enumerate(n.inputs):
            if v is None or i in value_inputs or v.kind != "tensor":
                continue
            if v.type.dtype is None:
                return []  # unknown element type: leave the node alone
            if v.type.dtype.is_float:
                out.append(i)
        return out

    # -- rewrite ----------------------------------------------------------------------------------
    def run(self, g: Graph, ctx: PassContext) -> bool:
        # the interface's types, before anything changes (an output that is a capture: before the outer lowering)
        declared = [self._made_low.get(v, v.type.dtype) for v in g.outputs]
        # a body's captures that the enclosing graph's lowering made low are read as low values
        low_vals = {id(v) for v in g.captures if v in self._made_low}
        changed = self._lower_nodes(g, low_vals)
        changed |= self._keep_output_types(g, low_vals, declared)
        if changed:
            _infer_flat(g, ctx.logger)
            n_low = sum(1 for n in g.nodes if any(id(o) in low_vals for o in n.outputs))
            n_cast = sum(1 for n in g.nodes if n.op_type == "Cast" and n.name.startswith("cast_"))
            ctx.logger.verbose(f"Reduced precision ({self.dtype.value}): {n_low} layers in {self.dtype.value}, "
                               f"{n_cast} Cast layers inserted")
        return changed

    def _lower_nodes(self, g: Graph, low_vals: set[int]) -> bool:
        """Each node of g in the low type or in float32, with Casts in front where the types change; the ids
        of the values that now hold the low type are added to `low_vals`."""
        low = self.dtype
        to_low: dict[int, Value] = {}  # float32 value -> its low-type twin (Cast output or converted const)
        to_f32: dict[int, Value] = {}  # low value -> its float32 twin (Cast output)
        new_nodes: list[Node] = []
        changed = False

        def cast(v: Value, dt: DType, cache: dict[int, Value]) -> Value:
            if id(v) in cache:
                return cache[id(v)]
            if v.is_const:
                out = g.constant(f"{v.name}_{dt.value}", v.const.to(dt.torch))  # type: ignore[union-attr]
            else:
                out = g.new_value(f"{v.name}_{dt.value}", TensorType(dt, v.type.shape))
                new_nodes.append(Node("Cast", [v], [out], {"to": dt.onnx}, name=g.unique_name(f"cast_{v.name}")))
            cache[id(v)] = out
            return out

        for n in list(g.nodes):
            if n.op_type in NEUTRAL_OPS and n.domain in ("", "ai.onnx"):
                new_nodes.append(n)
                continue
            if self.runs_low(n):
                before = [o.type.dtype for o in n.outputs]
                if n.op_type == "Attention" and n.attr("softmax_precision") is None:
                    n.attrs["softmax_precision"] = 1  # the float32 model's softmax stays float32 (ONNX: Q's type)
                for i in self._cast_indices(n):
                    v = n.inputs[i]
                    assert v is not None
                    if id(v) in low_vals or v.type.dtype == low:
                        continue
                    n.inputs[i] = cast(v, low, to_low)
                    changed = True
                new_nodes.append(n)
                _retype(n)
                for k, o in enumerate(n.outputs):
                    # an output whose element type inference could not tell is the low type too: these
                    # ops compute in their float input's type (all but the index / mask outputs)
                    unknown = o.kind == "tensor" and o.type.dtype is None and (k == 0 or n.op_type not in INDEX_OUTPUTS)
                    if _is_float32(o) or unknown or o.type.dtype == low:
                        self._made_low.setdefault(o, before[k])
                        o.type = TensorType(low, o.type.shape)
                        low_vals.add(id(o))
                        changed = True
            else:
                # a node's captures stay as they are: its bodies read them in whatever type they now have
                for i, v in enumerate(n.inputs):
                    if v is not None and id(v) in low_vals:
                        n.inputs[i] = cast(v, DType.FLOAT32, to_f32)
                        changed = True
                new_nodes.append(n)
                _retype(n)
        g.nodes = new_nodes
        return changed

    def _keep_output_types(self, g: Graph, low_vals: set[int], declared: list[DType | None]) -> bool:
        """g's outputs keep their declared element types (float32 where none was declared): the producer of a
        low output writes a renamed low value and a Cast restores the name; a low output nobody in g
        produces (a captured outer value) is replaced by a Cast of it."""
        changed = False
        own = {id(n) for n in g.nodes}
        for k, v in enumerate(list(g.outputs)):
            if id(v) not in low_vals:
                continue
            want = declared[k] or DType.FLOAT32
            if want == self.dtype:
                continue
            producer = v.producer
            if producer is None or id(producer) not in own:
                out = g.new_value(f"{v.name}_{want.value}", TensorType(want, v.type.shape))
                g.nodes.append(Node("Cast", [v], [out], {"to": want.onnx}, name=g.unique_name(f"cast_{v.name}")))
                g.outputs[k] = out
                changed = True
                continue
            inner = g.new_value(f"{v.name}_{self.dtype.value}", TensorType(self.dtype, v.type.shape))
            producer.outputs = [inner if o is v else o for o in producer.outputs]
            inner.producer = producer
            _redirect_readers(g, v, inner)
            g.nodes.append(Node("Cast", [inner], [v], {"to": want.onnx}, name=g.unique_name(f"cast_{v.name}")))
            v.type = TensorType(want, v.type.shape)
            self._made_low.pop(v, None)
            self._made_low[inner] = want
            low_vals.discard(id(v))
            low_vals.add(id(inner))
            changed = True
        return changed


def cpu_precision(dtype: DType, logger: Logger) -> DType | None:
    """The low type a CPU build runs: `dtype` where this CPU computes it natively, else None (float32), with
    one warning saying so."""
    from kiln.backends.cpu.features import native_low_precision
    if native_low_precision(dtype):
        return dtype
    if dtype == DType.BFLOAT16:
        logger.warning("this CPU has no BF16 instructions: building FP32")
    else:
        logger.warning("the CPU target has no FP16 kernels: building FP32")
    return None


def precision_dtype(fp16: bool, bf16: bool) -> DType | None:
    """The low type a build asks for (float16 wins when both flags are set)."""
    if fp16:
        return DType.FLOAT16
    if bf16:
        return DType.BFLOAT16
    return None


