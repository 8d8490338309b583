"""kiln.from_torch: a torch module exported, built and run, against the module's own float64 output."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch.export import Dim

import kiln
from kiln.builder import BuilderConfig, OptimizationProfile
from kiln.errors import InputError, KilnError, ProfileError
from kiln.logger import Logger
from tests.conftest import rel_error

TOL = 1e-4


class ConvNet(torch.nn.Module):
    """conv + batchnorm + relu + pooling + linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(y, 4).flatten(1))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(a)) * b


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a value: torch.export cannot capture it
            return x * 2
        return x - 1


class Eigh(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.T)[0]  # no ONNX translation


def _convnet(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    m = ConvNet()
    with torch.no_grad():  # running statistics away from the identity, so folding BN is exercised
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _reference(module: torch.nn.Module, *xs: np.ndarray) -> np.ndarray:
    """The module's own output in float64 (a copy: the caller's module stays float32)."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(torch.from_numpy(x).double() for x in xs)).numpy()


def test_static_module_matches_float64_torch():
    rng = np.random.default_rng()
    module = _convnet(int(rng.integers(1 << 30)))
    engine = kiln.from_torch(module, (torch.randn(2, 3, 16, 16),))
    assert engine.plan.profiles == [] and engine.plan.inputs[0]["shape"] == [2, 3, 16, 16]
    ctx = engine.create_execution_context()
    outs = []
    for _ in range(2):  # fresh inputs, not the example the export saw
        x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
        got = ctx.execute({"x": x})[engine.output_names[0]]
        want = _reference(module, x)
        assert got.shape == want.shape == (2, 10)
        assert rel_error(got, want) < TOL
        outs.append(got)
    assert rel_error(outs[0], outs[1]) > 1e-2  # the output follows the input


def test_dynamic_batch_two_sizes_and_profile():
    rng = np.random.default_rng()
    module = _convnet(int(rng.integers(1 << 30)))
    engine = kiln.from_torch(module, (torch.randn(2, 3, 16, 16),), dynamic_shapes={"x": {0: Dim("batch", max=8)}},
                             input_names=["images"], output_names=["logits"])
    assert engine.input_names == ["images"] and engine.output_names == ["logits"]
    assert engine.plan.profiles == [{"images": {"min": [1, 3, 16, 16], "opt": [2, 3, 16, 16], "max": [8, 3, 16, 16]}}]
    ctx = engine.create_execution_context()
    for batch in (3, 7):
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        got = ctx.execute({"images": x})["logits"]
        assert got.shape == (batch, 10)
        assert rel_error(got, _reference(module, x)) < TOL
    with pytest.raises(InputError, match=r"outside the profile range \[1, 3, 16, 16\]\.\.\[8, 3, 16, 16\]"):
        ctx.execute({"images": np.zeros((9, 3, 16, 16), np.float32)})


def test_unbounded_dim_gets_a_named_range_and_inputs_map_by_name():
    """Dim without max: a range from the example, named in a warning; dynamic_shapes keyed by argument name
    (given out of order) reach the right inputs, a Dim shared by two inputs too."""
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    module = TwoInputs().eval()
    batch = Dim("batch")
    log = io.StringIO()
    engine = kiln.from_torch(module, (torch.randn(3, 6), torch.randn(3, 4)),
                             dynamic_shapes={"b": {0: batch}, "a": {0: batch}}, logger=Logger(stream=log))
    hi = max(kiln.torch_export.UNBOUNDED_FACTOR * 3, kiln.torch_export.UNBOUNDED_MIN_MAX)
    assert f"a[0] 1..{hi}" in log.getvalue() and f"b[0] 1..{hi}" in log.getvalue()
    assert engine.plan.profiles == [{"a": {"min": [1, 6], "opt": [3, 6], "max": [hi, 6]},
                                     "b": {"min": [1, 4], "opt": [3, 4], "max": [hi, 4]}}]
    ctx = engine.create_execution_context()
    for n in (1, hi):
        a = rng.standard_normal((n, 6)).astype(np.float32)
        b = rng.standard_normal((n, 4)).astype(np.float32)
        got = ctx.execute([a, b])[engine.output_names[0]]
        assert rel_error(got, _reference(module, a, b)) < TOL


def test_config_profiles_are_kept():
    module = _convnet(0)
    prof = OptimizationProfile().set_shape("x", (1, 3, 16, 16), (4, 3, 16, 16), (5, 3, 16, 16))
    cfg = BuilderConfig(device="cpu", optimization_level=0, profiles=[prof])
    engine = kiln.from_torch(module, torch.randn(2, 3, 16, 16), dynamic_shapes=({0: "n"},), config=cfg)
    assert engine.plan.profiles == [prof.to_json()]
    assert engine.plan.build["optimization_level"] == 0
    x = np.random.default_rng().standard_normal((5, 3, 16, 16)).astype(np.float32)
    assert rel_error(engine.create_execution_context().execute({"x": x})[engine.output_names[0]],
                     _reference(module, x)) < TOL


@pytest.mark.parametrize("module, args, fragments", [
    (DataDependent(), (torch.randn(4),), ["cannot export DataDependent to ONNX", "torch.export", "data-dependent"]),
    (Eigh(), (torch.randn(3, 3),), ["cannot export Eigh to ONNX", "no ONNX translation", "aten._linalg_eigh"]),
])
def test_export_failure_is_one_kiln_error_line(module, args, fragments, capfd):
    with pytest.raises(KilnError) as e:
        kiln.from_torch(module, args)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and msg.startswith("from_torch: "), msg
    assert all(f in msg for f in fragments), msg
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out + err)[-500:]  # the exporter's dumps and logs held back


def test_build_failure_names_the_module():
    bad = BuilderConfig(profiles=[OptimizationProfile().set_shape("nope", (1, 4), (1, 4), (1, 4))])
    with pytest.raises(ProfileError) as e:
        kiln.from_torch(torch.nn.Linear(4, 2).eval(), torch.randn(1, 4), config=bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("from_torch: Linear exported to ONNX but does not build") \
        and "'nope'" in msg, msg


@pytest.mark.parametrize("module, args, dyn, fragment", [
    (lambda x: x, (torch.randn(2),), None, "expected a torch.nn.Module, got function"),
    (torch.nn.Linear(4, 2), "abc", None, "example_inputs must be a tensor"),
    (torch.nn.Linear(4, 2), (torch.randn(1, 4), 3), None, "[Tensor, int]"),
    (torch.nn.Linear(4, 2), (torch.randn(2, 4),), {"y": {0: Dim("b")}}, "names 'y', which is not one of"),
    (torch.nn.Linear(4, 2), (torch.randn(2, 4),), ({0: "b"}, {0: "c"}), "2 entries for 1 example inputs"),
])
def test_bad_arguments(module, args, dyn, fragment):
    with pytest.raises(KilnError) as e:
        kiln.from_torch(module, args, dynamic_shapes=dyn)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_training_mode_is_named():
    log = io.StringIO()
    module = _convnet(0).train()
    kiln.from_torch(module, torch.randn(2, 3, 16, 16), logger=Logger(stream=log),
                    config=BuilderConfig(optimization_level=0))
    assert "BatchNorm2d in training mode" in log.getvalue()
