"""Test helpers: one-node ONNX models and a check of Kiln against an independent oracle."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kiln.builder import Builder, BuilderConfig
from kiln.plan.format import plan_from_bytes, plan_to_bytes
from kiln.runtime.engine import Engine


def _np_to_onnx_type(dt: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dt))


def make_node_model(op_type: str, inputs: dict[str, np.ndarray], outputs: list[str] | int = 1,
                    attrs: dict[str, Any] | None = None, opset: int = 17,
                    const_inputs: dict[str, np.ndarray] | None = None, domain: str = "") -> onnx.ModelProto:
    """A model with one node. `inputs` are graph inputs, `const_inputs` initializers; order: inputs then consts.

    An input name starting with '_' is passed to the node as an omitted (empty) input.
    """
    const_inputs = const_inputs or {}
    names = list(inputs) + list(const_inputs)
    out_names = [f"y{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
    node = helper.make_node(op_type, [("" if n.startswith("_") else n) for n in names], out_names,
                            domain=domain or None, **(attrs or {}))
    g_inputs = [helper.make_tensor_value_info(n, _np_to_onnx_type(a.dtype), a.shape)
                for n, a in inputs.items() if not n.startswith("_")]
    inits = [numpy_helper.from_array(a, n) for n, a in const_inputs.items() if not n.startswith("_")]
    g_outputs = [helper.make_empty_tensor_value_info(n) for n in out_names if n]
    graph = helper.make_graph([node], f"{op_type}_test", g_inputs, g_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model


def run_kiln(model: onnx.ModelProto, feeds: dict[str, Any], device: str = "cpu",
             config: BuilderConfig | None = None) -> list[Any]:
    """Build (round-tripping the plan through bytes), run, return outputs in graph order."""
    cfg = config or BuilderConfig(device=device)
    plan = Builder().build(model, cfg)
    engine = Engine(plan_from_bytes(plan_to_bytes(plan)))
    out = engine.create_execution_context().execute(feeds)
    return [out[n] for n in engine.output_names]


def run_oracle(model: onnx.ModelProto, feeds: dict[str, Any]) -> list[Any]:
    """onnxruntime where it can run the model, else the ONNX reference evaluator."""
    try:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception:
        from onnx.reference import ReferenceEvaluator
        return ReferenceEvaluator(model).run(None, feeds)


def check_model(model: onnx.ModelProto, feeds: dict[str, Any], rtol: float = 1e-4, atol: float = 1e-5,
                oracle: str = "auto") -> list[Any]:
    """Assert Kiln's outputs match the oracle's (shape, dtype, values); returns Kiln's outputs."""
    got = run_kiln(model, feeds)
    if oracle == "reference":
        from onnx.reference import ReferenceEvaluator
        want = ReferenceEvaluator(model).run(None, feeds)
    else:
        want = run_oracle(model, feeds)
    assert len(got) == len(want), f"{len(got)} outputs, oracle has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"output {i}: shape {g.shape} != oracle {w.shape}"
        assert g.dtype == w.dtype, f"output {i}: dtype {g.dtype} != oracle {w.dtype}"
        if g.dtype.kind in "fc":
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=rtol, atol=atol,
                                       err_msg=f"output {i}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"output {i}")
    return got


def assert_close_to_scale(got: Any, want: Any, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Element-wise closeness with `atol` scaled by the result's magnitude, max(1, max |want|).

    A float32 kernel that sums in another order (Winograd transforms, blocked GEMMs) is accurate to the
    size of the terms it sums, not to each result: an output that cancels to near zero carries an
    error proportional to the layer's scale, which a fixed atol would flag on some random inputs.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


def exact_int8_cpu() -> tuple[bool, str]:
    """(whether the CPU target builds every int8 layer on integer kernels here, the skip reason for tests that need
    that): x86 CPUs without VNNI compute exactly only uint8 inputs times weights within +-64
    (kiln.backends.cpu.features.exact_int8_layer), so a Q/DQ model's other layers build in float there."""
    from kiln.backends.cpu.features import NO_VNNI_INT8, exact_int8
    ok, why = calibrated_int8_cpu()
    if not ok:
        return ok, why
    return exact_int8(), (f"{NO_VNNI_INT8}, so a Q/DQ model's full-range layers build in float (tested by "
                          "test_quantize.py::test_int8_without_vnni_builds_uint8_layers_with_7_bit_weights)")


def calibrated_int8_cpu() -> tuple[bool, str]:
    """(whether the CPU target builds Kiln's own calibrated INT8 on integer kernels here, the skip reason): wherever
    the oneDNN library is installed (on x86 without VNNI with uint8 activations and 7-bit weights)."""
    from kiln.backends.cpu.dnnl import library
    if library() is None:
        return False, "the oneDNN library (pip install onednn-cpu-gomp) is not installed: no CPU int8 kernels"
    return True, ""
