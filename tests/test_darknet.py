"""The Darknet importer (kiln.frontend.darknet) against an independent oracle.

The oracle is written apart from the importer, in examples/darknet_torch.py (which imports nothing from
kiln): a small Darknet .cfg -> torch interpreter with its own parser, shape bookkeeping and weights writer.
Each test draws random weights, writes them into a .weights file, imports the .cfg + .weights with Kiln,
builds the same network from the same weights in torch, and compares Kiln's outputs with the torch module
run in float64 and with Kiln's build of the torch module's ONNX export. Malformed .cfg and .weights files
must fail with one line naming the layer.
"""
from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
import torch

from examples.darknet_torch import DarknetTorch, oracle_cfg, oracle_layers, random_params, write_weights
from kiln.builder import Builder, BuilderConfig, OptimizationProfile
from kiln.errors import KilnError
from kiln.frontend.darknet import load_darknet, parse_darknet_cfg
from kiln.logger import Logger, Severity
from kiln.runtime.engine import Engine
from tests.conftest import rel_error

CFGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "darknet_cfgs")
TOL = 1e-4  # normwise relative error of float32 against the float64 oracle, and between two float32 builds
TOL_YOLOV4 = 3e-4  # float32 against float32 (torch, Kiln's ONNX build) through YOLOv4's 110 convolutions


# ---- helpers -------------------------------------------------------------------------------------------

def _quiet() -> Logger:
    return Logger(Severity.ERROR)


def _run(plan, x: np.ndarray) -> list[np.ndarray]:
    outs = Engine(plan).create_execution_context().execute({"input": x})
    return [np.asarray(v) for v in outs.values()]


def _cpu(**kw) -> BuilderConfig:
    return BuilderConfig(device="cpu", optimization_level=0, **kw)


def _setup(tmp_path, cfg: str, seed: int, **kw):
    layers = oracle_layers(oracle_cfg(cfg))
    rng = np.random.default_rng(seed)
    params = random_params(layers, rng)
    with torch.no_grad():
        DarknetTorch(layers, params, calibrate=rng)(torch.from_numpy(_image(cfg, seed + 100, calib=True)))
    weights = str(tmp_path / (os.path.basename(cfg)[:-4] + ".weights"))
    write_weights(weights, layers, params, **kw)
    return layers, params, weights


def _image(cfg: str, seed: int, batch: int = 1, calib: bool = False) -> np.ndarray:
    """A random image of the .cfg's size (calib: at most 160x160, for BN statistics at less cost)."""
    net = oracle_cfg(cfg)[0]
    h, w = int(net["height"]), int(net["width"])
    if calib and h > 160:
        h = w = 160
    shape = (batch, int(net["channels"]), h, w)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _oracle64(model: DarknetTorch, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model.double()(torch.from_numpy(x).double())]


def _oracle32(model: DarknetTorch, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model.float()(torch.from_numpy(x))]


def _compare_with_onnx(tmp_path, name: str, seed: int, oracle=_oracle64, tol: float = TOL) -> dict[str, float]:
    """Kiln's Darknet import against the torch oracle and against Kiln's build of the oracle's ONNX export."""
    times = {}
    cfg = os.path.join(CFGS, name)
    t = time.perf_counter()
    layers, params, weights = _setup(tmp_path, cfg, seed)
    times["weights"] = time.perf_counter() - t
    x = _image(cfg, seed + 1)
    t = time.perf_counter()
    plan = Builder(_quiet()).build(load_darknet(cfg, weights), _cpu())
    times["darknet import + build"] = time.perf_counter() - t
    heads = [i for i, d in enumerate(layers) if d["kind"] == "yolo"]
    assert [o["name"] for o in plan.outputs] == [f"yolo{i}" for i in heads]
    t = time.perf_counter()
    ctx = Engine(plan).create_execution_context()
    got = [np.asarray(v) for v in ctx.execute({"input": x}).values()]
    times["run"] = time.perf_counter() - t
    other = [np.asarray(v) for v in ctx.execute({"input": _image(cfg, seed + 2)}).values()]
    for g, o in zip(got, other):  # the maps follow the image (a network that ignored it would pass less)
        assert rel_error(o, g) > 0.01
    model = DarknetTorch(layers, params).eval()
    onnx_path = str(tmp_path / "model.onnx")
    t = time.perf_counter()
    torch.onnx.export(model, (torch.from_numpy(x),), onnx_path, input_names=["input"],
                      output_names=[f"head{i}" for i in heads], opset_version=17, dynamo=False)
    via_onnx = _run(Builder(_quiet()).build(onnx_path, _cpu()), x)
    times["onnx export + build + run"] = time.perf_counter() - t
    t = time.perf_counter()
    want = oracle(model, x)
    times["oracle"] = time.perf_counter() - t
    for g, o, w in zip(got, via_onnx, want):
        print(f"{name}: vs torch {rel_error(g, w):.3g}, vs onnx {rel_error(g, o):.3g}, onnx vs torch {rel_error(o, w):.3g}")
        assert g.shape == w.shape
        assert rel_error(g, w) < tol, f"darknet import vs torch: {rel_error(g, w):.3g}"
        assert rel_error(g, o) < tol, f"darknet import vs ONNX import: {rel_error(g, o):.3g}"
    print(name, {k: round(v, 2) for k, v in times.items()})
    return times


# ---- acceptance: the same outputs as the ONNX import of the same network ---------------------------------

def test_yolov4_tiny_matches_torch_and_onnx(tmp_path):
    _compare_with_onnx(tmp_path, "yolov4-tiny.cfg", seed=1)


def test_yolov4_416_matches_torch_and_onnx(tmp_path):
    # torch in float32 here: float64 convolutions of YOLOv4 take ~40 s on a 2-core CPU
    _compare_with_onnx(tmp_path, "yolov4.cfg", seed=2, oracle=_oracle32, tol=TOL_YOLOV4)


# ---- every translated feature, header versions, dynamic batch ------------------------------------------

@pytest.mark.parametrize("version,header", [((0, 2, 5), 20), ((0, 1, 0), 16), ((1, 0, 0), 20), ((1000, 0, 0), 16)])
def test_features_and_header_versions(tmp_path, version, header):
    cfg = os.path.join(CFGS, "features.cfg")
    layers, params, weights = _setup(tmp_path, cfg, seed=sum(version), version=version)
    n_floats = sum(v.size for p in params.values() for v in p.values())
    assert os.path.getsize(weights) == header + 4 * n_floats
    x = _image(cfg, seed=7)
    got = _run(Builder(_quiet()).build(load_darknet(cfg, weights, _quiet()), _cpu()), x)
    want = _oracle64(DarknetTorch(layers, params), x)
    assert [g.shape for g in got] == [(1, 14, 10, 8), (1, 14, 5, 4)]
    for g, w in zip(got, want):
        assert rel_error(g, w) < TOL, rel_error(g, w)


def test_dynamic_batch(tmp_path):
    cfg = os.path.join(CFGS, "features.cfg")
    layers, params, weights = _setup(tmp_path, cfg, seed=11)
    graph = load_darknet(cfg, weights, _quiet(), batch="N")
    profile = OptimizationProfile().set_shape("input", (1, 3, 37, 29), (2, 3, 37, 29), (4, 3, 37, 29))
    plan = Builder(_quiet()).build(graph, _cpu(profiles=[profile]))
    x = _image(cfg, seed=12, batch=3)
    for g, w in zip(_run(plan, x), _oracle64(DarknetTorch(layers, params), x)):
        assert g.shape[0] == 3 and rel_error(g, w) < TOL


def test_heads_metadata_and_repeated_key_warning(tmp_path):
    import io
    stream = io.StringIO()
    path = os.path.join(CFGS, "features.cfg")
    net = parse_darknet_cfg(path, Logger(Severity.WARNING, stream))
    first, again = [k for k, line in enumerate(open(path), start=1) if line.startswith("size=")][:2]
    assert f"(line {again}): 'size' given again (first at line {first}); the first value is used" in stream.getvalue()
    h1, h2 = net.heads
    assert (h1.layer, h1.output, h1.mask, h1.classes, h1.num, h1.scale_x_y, h1.stride) == \
        (15, "yolo15", [0, 1], 2, 3, 1.1, 3)
    assert h2.own_anchors == [(8.0, 9.0), (12.0, 13.0)] and h2.scale_x_y == 1.0 and h2.stride == 7
    tiny = parse_darknet_cfg(os.path.join(CFGS, "yolov4-tiny.cfg"))
    assert [(h.layer, h.mask, h.stride) for h in tiny.heads] == [(30, [3, 4, 5], 32), (37, [1, 2, 3], 16)]


# ---- malformed .cfg files ------------------------------------------------------------------------------

NET = "[net]\nwidth=16\nheight=16\nchannels=3\n"
CONV = "[convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky\n"


@pytest.mark.parametrize("text,expect", [
    (NET + CONV + "[foo]\nbar=1\n", r"layer 1 \[foo\] \(line 11\): section type unknown"),
    (NET + CONV + "[avgpool]\n", r"layer 1 \[avgpool\] \(line 11\): section type not supported"),
    (NET + CONV + "[route]\nlayers=-5\n", r"layer 1 \[route\] \(line 12\): 'layers=' index -5 is layer -4"),
    (NET + CONV + "[route]\nlayers=1\n", r"layer 1 \[route\] \(line 12\): 'layers=' index 1 is layer 1, not a layer before"),
    (NET + CONV + "[route]\n", r"layer 1 \[route\] \(line 11\): 'layers=' is missing"),
    (NET + "[convolutional]\nsize=3\nactivation=leaky\n", r"layer 0 \[convolutional\] \(line 5\): 'filters=' is missing"),
    (NET + CONV.replace("size=3", "size=three"), r"layer 0 \[convolutional\] \(line 7\): 'size=three' is not an integer"),
    (NET + CONV.replace("stride=1", "stride=0"), r"layer 0 \[convolutional\] \(line 8\): 'stride=0' is out of range"),
    (NET + CONV.replace("leaky", "hard_mish"), r"layer 0 \[convolutional\] \(line 10\): activation 'hard_mish' is not "),
    (NET + CONV + "binary=1\n", r"layer 0 \[convolutional\] \(line 11\): 'binary=1' is not supported"),
    (NET + CONV + "dilation=2\n", r"layer 0 \[convolutional\] \(line 11\): dilation other than 1"),
    (NET + CONV.replace("filters=4", "filters=4\ngroups=2"),
     r"layer 0 \[convolutional\] \(line 7\): groups=2 does not divide its 3 input channels"),
    (NET + CONV + "[shortcut]\nfrom=-1\nweights_type=per_channel\n",
     r"layer 1 \[shortcut\] \(line 13\): 'weights_type=per_channel' is not supported"),
    (NET + CONV + "[upsample]\nstride=-2\n", r"layer 1 \[upsample\] \(line 12\): a negative stride"),
    (NET + CONV + "[maxpool]\nsize=2\nstride=1\npadding=4\n", r"layer 1 \[maxpool\] \(line 14\): padding=4 leaves"),
    (NET + CONV + "[yolo]\nmask=0\nclasses=80\nnum=1\n",
     r"layer 1 \[yolo\] \(line 12\): the previous layer has 4 channels"),
    (NET + CONV + "[yolo]\nmask=0,3\nclasses=80\nnum=3\n", r"layer 1 \[yolo\] \(line 12\): mask value 3 is not an anchor"),
    (NET + CONV.replace("filters=4", "filters=4\nfilters"), r"line 7: expected key=value or \[section\], got 'filters'"),
    ("width=16\n" + NET + CONV, r"line 1: 'width=' comes before the first section"),
    (CONV, r"line 1: the first section must be \[net\]"),
    (NET, r"\[net\] is followed by no layers"),
    (NET.replace("channels=3\n", "") + CONV, r"\[net\] \(line 1\): 'channels=' is missing"),
    (NET.replace("width=16", "width=100000") + CONV, r"\[net\] \(line 2\): 'width=100000' is out of range"),
    ("[net]\nwidth=60000\nheight=60000\nchannels=3\n" + CONV.replace("filters=4", "filters=60000"),
     r"layer 0 \[convolutional\] \(line 5\): its output 60000x60000x60000 needs \d+ bytes, over the"),
    (NET + CONV.replace("size=3", "size=99").replace("pad=1", "pad=0"),
     r"layer 0 \[convolutional\] \(line 7\): size=99 is larger than its padded 16x16 input"),
])
def test_malformed_cfg(tmp_path, text, expect):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    with pytest.raises(KilnError) as e:
        parse_darknet_cfg(str(path), _quiet())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert re.search(expect, msg), msg


def test_cfg_not_text_or_missing(tmp_path):
    path = tmp_path / "w.cfg"
    path.write_bytes(b"\x00\x00\x00\x00\x02\x00")
    with pytest.raises(KilnError, match="not a text file"):
        parse_darknet_cfg(str(path))
    with pytest.raises(KilnError, match="Darknet .cfg not found"):
        parse_darknet_cfg(str(tmp_path / "missing.cfg"))


def test_huge_declared_weights_fail_before_allocating(tmp_path):
    """A .cfg declaring billions of weights with a small .weights file fails on the length, at once."""
    cfg = tmp_path / "huge.cfg"
    cfg.write_text("[net]\nwidth=1\nheight=1\nchannels=3\n" + CONV.replace("filters=4", "filters=65536")
                   .replace("size=3", "size=511") + CONV.replace("filters=4", "filters=65536"))
    weights = tmp_path / "huge.weights"
    weights.write_bytes(np.array([0, 2, 0], "<i4").tobytes() + bytes(8 + 4000))
    t = time.perf_counter()
    with pytest.raises(KilnError) as e:
        load_darknet(str(cfg), str(weights), _quiet())
    assert time.perf_counter() - t < 5
    assert re.search(r"the weights end inside layer 0 \[convolutional\] \(line 5\): it needs 205\d+ bytes from "
                     r"offset 20, 4000 remain", str(e.value)), str(e.value)


# ---- .weights of the wrong length ----------------------------------------------------------------------

def _conv_spans(layers, params, header):
    """(layer index, first byte, end byte) of each conv layer in the file, from the oracle's own counts."""
    spans, off = [], header
    for i in sorted(params):
        n = 4 * sum(v.size for v in params[i].values())
        spans.append((i, off, off + n))
        off += n
    return spans


def test_weights_too_short_or_too_long(tmp_path):
    cfg = os.path.join(CFGS, "yolov4-tiny.cfg")
    layers, params, weights = _setup(tmp_path, cfg, seed=3)
    data = open(weights, "rb").read()
    spans = _conv_spans(layers, params, 20)
    assert spans[-1][2] == len(data)
    rng = np.random.default_rng(4)
    lines = {}
    for k in (0, int(rng.integers(1, len(spans) - 1)), len(spans) - 1):
        i, start, end = spans[k]
        cut = int(rng.integers(start, end))  # ends inside layer i
        bad = tmp_path / f"short{k}.weights"
        bad.write_bytes(data[:cut])
        with pytest.raises(KilnError) as e:
            load_darknet(cfg, str(bad), _quiet())
        lines[f"short in layer {i}"] = msg = str(e.value)
        assert "\n" not in msg and f"the weights end inside layer {i} [convolutional]" in msg, msg
        assert f"{end - start} bytes from offset {start}, {cut - start} remain" in msg, msg
    for extra in (4, 1):
        bad = tmp_path / f"long{extra}.weights"
        bad.write_bytes(data + bytes(extra))
        with pytest.raises(KilnError) as e:
            load_darknet(cfg, str(bad), _quiet())
        lines[f"{extra} extra"] = msg = str(e.value)
        said = "4 bytes remain" if extra == 4 else "1 byte remains"
        assert f"{said} after the last weighted layer, layer 36 [convolutional] (line " in msg, msg
    header = tmp_path / "header.weights"
    header.write_bytes(data[:10])
    with pytest.raises(KilnError, match="too short for a Darknet weights header"):
        load_darknet(cfg, str(header), _quiet())
    with pytest.raises(KilnError, match="weights file not found"):
        load_darknet(cfg, str(tmp_path / "nope.weights"), _quiet())
    for k, v in lines.items():
        print(f"{k}: {v}")


def test_weights_with_other_header_version_do_not_fit(tmp_path):
    """The same floats behind a version-0.1 header (4 bytes shorter) are 4 bytes short in the last layer."""
    cfg = os.path.join(CFGS, "features.cfg")
    layers, params, weights = _setup(tmp_path, cfg, seed=5)
    data = bytearray(open(weights, "rb").read())
    data[0:8] = np.array([0, 1], "<i4").tobytes()  # version 0.2 -> 0.1: `seen` is 4 bytes, not 8
    (tmp_path / "v01.weights").write_bytes(bytes(data))
    last = max(params)
    with pytest.raises(KilnError, match=rf"4 bytes remain after the last weighted layer, layer {last} "):
        load_darknet(cfg, str(tmp_path / "v01.weights"), _quiet())


# ---- the command line ----------------------------------------------------------------------------------

def test_cli_build_darknet(tmp_path, capsys):
    from kiln.cli.main import main
    cfg = os.path.join(CFGS, "features.cfg")
    layers, params, weights = _setup(tmp_path, cfg, seed=9)
    out = tmp_path / "f.kiln"
    assert main(["build", cfg, "--weights", weights, "-o", str(out), "--device", "cpu", "--opt-level", "0"]) == 0
    assert "wrote " in capsys.readouterr().out
    x = _image(cfg, seed=10)
    got = Engine.load(str(out)).create_execution_context().execute({"input": x})
    assert list(got) == ["yolo15", "yolo19"]
    for g, w in zip(got.values(), _oracle64(DarknetTorch(layers, params), x)):
        assert rel_error(np.asarray(g), w) < TOL

    # dynamic batch when shapes are given for the input
    out2 = tmp_path / "f2.kiln"
    assert main(["build", cfg, "--weights", weights, "-o", str(out2), "--device", "cpu", "--opt-level", "0",
                 "--shapes", "input:2x3x37x29", "-q"]) == 0
    assert Engine.load(str(out2)).plan.inputs[0]["shape"][0] == 2


@pytest.mark.parametrize("case", ["no weights", "weights for onnx", "bad cfg", "short weights", "weights is output"])
def test_cli_errors(tmp_path, capsys, case, light_dir):
    from kiln.cli.main import main
    cfg = os.path.join(CFGS, "features.cfg")
    out = tmp_path / "out.kiln"
    args = ["build", cfg, "-o", str(out), "--device", "cpu", "--opt-level", "0"]
    if case == "weights for onnx":
        args[1] = os.path.join(light_dir, "light_resnet50.onnx")
        args += ["--weights", cfg]
        expect = "--weights goes with a Darknet .cfg model"
    elif case == "bad cfg":
        bad = tmp_path / "bad.cfg"
        bad.write_text(NET + CONV + "[route]\nlayers=-7\n")
        args[1] = str(bad)
        args += ["--weights", cfg]
        expect = "layer 1 [route] (line 12): 'layers=' index -7"
    elif case == "short weights":
        _, _, weights = _setup(tmp_path, cfg, seed=1)
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) - 8)
        args += ["--weights", weights]
        expect = "the weights end inside layer 18 [convolutional]"
    elif case == "weights is output":
        args += ["--weights", str(out)]
        out.write_bytes(b"x")
        expect = "is the --weights file"
    else:
        expect = "is a Darknet .cfg: give its weights with --weights"
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the .cfg's repeated-key warning, then the error
    assert lines[-1].startswith("kiln: error: ") and expect in lines[-1], lines
    assert all(line.startswith("[kiln] [W] ") for line in lines[:-1]) and "Traceback" not in "".join(lines), lines
    assert not out.exists() or out.read_bytes() == b"x"
