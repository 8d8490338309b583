"""`kiln inspect`: text and JSON against the plan as the full loader reads it, no torch import, the HTML report
parsed structurally (one SVG node per layer, names escaped, profile times), and refusals of bad plans and
profiles with one line."""
from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.backends.tactic import get_tactic, is_layer
from kiln.builder import Builder, BuilderConfig
from kiln.cli.main import main
from kiln.plan.format import load_plan, save_plan

EVIL = '<script>alert("x")</script> & <b>'
NODES = ["first", "bn1", "relu1", "conv2", "add", "relu2", "gap", "flatten", "fc", "softmax"]


def _model(first: str = "first"):
    """conv + BN + ReLU, conv + residual Add + ReLU, global pool, flatten, gemm, softmax; fresh random weights."""
    rng = np.random.default_rng()

    def f(*s):
        return rng.standard_normal(s).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", f(8, 3, 3, 3)), ("b1", f(8)), ("s", np.abs(f(8)) + 0.5), ("bb", f(8)), ("m", f(8)),
        ("v", np.abs(f(8)) + 0.5), ("w2", f(8, 8, 3, 3)), ("b2", f(8)), ("wf", f(5, 8)), ("bf", f(5))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name=first, pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["fl"], name="flatten"),
             helper.make_node("Gemm", ["fl", "wf", "bf"], ["y0"], name="fc", transB=1),
             helper.make_node("Softmax", ["y0"], ["y"], name="softmax")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "tiny.kiln"
    save_plan(Builder().build(_model(), BuilderConfig(device="cpu", optimization_level=1)), path)
    return str(path)


@pytest.fixture(scope="module")
def evil_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "evil.kiln"
    save_plan(Builder().build(_model(EVIL), BuilderConfig(device="cpu", optimization_level=0)), path)
    return str(path)


def _run(capsys, *argv):
    rc = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _doc(capsys, path, *extra):
    rc, out, err = _run(capsys, path, "--format", "json", *extra)
    assert rc == 0, err
    return json.loads(out)


# ---- text and JSON against the plan ------------------------------------------------------------------------

def test_json_agrees_with_the_loaded_plan(plan_path, capsys):
    doc = _doc(capsys, plan_path)
    plan = load_plan(plan_path)  # the full loader (torch, schema, graph rebuild): the oracle
    steps = plan.graph["steps"]
    launching = [s for s in steps if is_layer(s["tactic"])]
    t = doc["totals"]
    assert t["layers"] == len(launching) == plan.build["layers"] and t["steps"] == len(steps)
    assert [(r["name"], r["op"], r["tactic"], r["config"]) for r in doc["layers"]] == \
        [(s["name"], s["op"], s["tactic"], s["config"]) for s in steps]
    assert [r["launches"] for r in doc["layers"]] == [is_layer(s["tactic"]) for s in steps]
    assert t["layers_by_tactic"] == dict(Counter(s["tactic"] for s in launching))
    assert t["layers_by_op"] == dict(Counter(s["op"] for s in launching))
    assert t["reference_layers"] == sum(s["tactic"] == "ref" for s in launching)
    assert sum(t["layers_by_precision"].values()) == len(launching)
    assert t["weights"] == {"tensors": len(plan.weights),
                            "bytes": sum(w.numel() * w.element_size() for w in plan.weights.values())}
    assert t["activations"] == {k: plan.memory[k] for k in ("arena_bytes", "naive_bytes")}
    assert doc["tuning"] == plan.build["tuning"] and doc["tuning"]["layers_timed"] > 0
    assert doc["inputs"] == plan.inputs and doc["outputs"] == plan.outputs
    values = plan.graph["values"]
    for r, s in zip(doc["layers"], steps):
        assert [(o["name"], o["dtype"], o["shape"]) for o in r["outputs"]] == \
            [(o, values[o]["type"]["dtype"], values[o]["type"]["shape"]) for o in s["outputs"]]
    # every model node is held by exactly one layer; the epilogues sit in their convolutions
    members = [m["name"] for r in doc["layers"] for m in r["fused"]]
    assert sorted(members) == sorted(NODES)
    held = {r["name"]: {m["name"] for m in r["fused"]} for r in doc["layers"]}
    assert {"first", "bn1", "relu1"} <= held["first"] and {"conv2", "add", "relu2"} <= held["conv2"]
    ws = doc["totals"]["workspace"]
    assert ws["layers"] == len(plan.build["workspace"]) and ws["max_bytes"] == max(plan.build["workspace"].values(), default=0)


def test_text_agrees_with_json(plan_path, capsys):
    doc = _doc(capsys, plan_path)
    rc, text, _ = _run(capsys, plan_path)
    assert rc == 0
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("#"))
    rows = lines[head + 1:]
    assert len(rows) == doc["totals"]["steps"]
    for row, r in zip(rows, doc["layers"]):
        cells = row.split()
        assert cells[0] == str(r["index"]) and cells[1] == r["name"] and cells[2] == r["op"] and r["tactic"] in cells
        for m in r["fused"] if len(r["fused"]) > 1 else []:
            assert f"{m['op']}({m['name']})" in row
    t = doc["totals"]
    summary = {line.split()[0]: line for line in lines[:head] if line.strip()}
    assert summary["Layers"].split()[1] == str(t["layers"])
    assert f"({t['weights']['bytes']} bytes)" in summary["Weights"]
    assert f"{doc['tuning']['layers_timed']} layers timed" in summary["Autotuning"]
    for tactic, n in t["layers_by_tactic"].items():
        assert f"{tactic} {n}" in text
    rc, short, _ = _run(capsys, plan_path, "--summary")
    assert short.splitlines() == lines[:head - 1]


def test_json_summary_has_totals_and_no_layers(plan_path, capsys):
    full, short = _doc(capsys, plan_path), _doc(capsys, plan_path, "--summary")
    assert "layers" not in short and short["totals"] == full["totals"]


def test_inspect_does_not_import_torch(plan_path, tmp_path):
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"layers": {s["name"]: {"ms": 1.0, "percent": 10.0}
                                           for s in load_plan(plan_path).graph["steps"]}}))
    code = ("import sys\nfrom kiln.cli.main import main\n"
            f"rc = main(['inspect', {plan_path!r}, '--report', {str(tmp_path / 'r.html')!r}, '--profile', {str(prof)!r}])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors', 'onnx'))\n"
            "print('HEAVY', heavy, rc, file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "HEAVY [] 0" in p.stderr, p.stderr
    assert (tmp_path / "r.html").is_file()


def test_non_launching_table_matches_the_registry():
    from kiln.backends import tactic as registry
    from kiln.plan.inspect import NON_LAUNCHING
    get_tactic("ref")  # loads every backend's tactics
    for tid, t in registry._TACTICS.items():
        assert (tid in NON_LAUNCHING) == (not t.launches), tid
        if tid in NON_LAUNCHING:
            assert NON_LAUNCHING[tid] == ("view" if t.is_view else "elided")


def test_header_limits_match_the_schema():
    from kiln.plan import header, schema
    assert (header.MAX_HEADER_BYTES, header.MAX_JSON_DEPTH) == (schema.MAX_HEADER_BYTES, schema.MAX_JSON_DEPTH)


# ---- the HTML report ---------------------------------------------------------------------------------------

class _Html(HTMLParser):
    """Tags, attributes and text of a page; counts unclosed elements."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "path", "rect", "img", "input", "link"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in ("path", "rect"):
            return
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    p = _Html()
    p.feed(raw)
    p.close()
    assert not p.stack, p.stack
    return raw, p


def _self_contained(raw, p):
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe", "img", "object", "embed")]
    for _, attrs in p.tags:
        for k, v in attrs.items():
            assert k not in ("src",) and not (k == "href" and v and not v.startswith("#")), (k, v)
    assert "http://" not in raw.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in raw
    assert "@import" not in raw and "url(" not in raw.replace("url(#arrow)", "")


def test_report_structure_and_profile_times(plan_path, tmp_path, capsys):
    doc = _doc(capsys, plan_path)
    rng = random.Random()
    names = [r["name"] for r in doc["layers"] if r["launches"]]
    ms = {n: rng.uniform(0.01, 5.0) for n in names}
    total = sum(ms.values())
    profile = {"device": "cpu", "iterations": 3, "layers": [
        {"name": n, "index": i, "mean_ms": ms[n], "percent": 100 * ms[n] / total} for i, n in enumerate(names)]}
    (tmp_path / "prof.json").write_text(json.dumps(profile))
    out = tmp_path / "engine.html"
    rc, _, err = _run(capsys, plan_path, "--report", str(out), "--profile", str(tmp_path / "prof.json"))
    assert rc == 0, err
    raw, p = _parse(out)
    _self_contained(raw, p)
    layers = [a for t, a in p.tags if t == "g" and a.get("class") == "layer"]
    assert len(layers) == doc["totals"]["layers"]
    assert [a["data-name"] for a in layers] == names
    assert len([a for t, a in p.tags if t == "g" and a.get("class") == "io"]) == len(doc["inputs"]) + len(doc["outputs"])
    rows = [a for t, a in p.tags if t == "tr" and (a.get("id") or "").startswith("layer-")]
    assert len(rows) == doc["totals"]["steps"]
    text = "".join(p.text)
    for n in names:
        assert f"{ms[n]:.4f}" in text and f"{ms[n]:.3f} ms" in text  # table and graph labels
        assert f"{100 * ms[n] / total:.1f}" in text
    # edges: one path per distinct producer -> reader pair of the plan
    made = {s["name"]: "in" for s in doc["inputs"]}
    pairs = set()
    for r in doc["layers"]:
        pairs |= {(made[v], r["name"]) for v in r["inputs"] if v in made}
        made.update({o["name"]: r["name"] for o in r["outputs"]})
    pairs |= {(made[s["name"]], "out:" + s["name"]) for s in doc["outputs"]}
    assert len([a for t, a in p.tags if t == "path" and a.get("marker-end")]) == len(pairs)
    # JSON with the same profile carries the same times
    doc2 = _doc(capsys, plan_path, "--profile", str(tmp_path / "prof.json"))
    assert {r["name"]: r["profile"]["ms"] for r in doc2["layers"] if r["profile"]} == pytest.approx(ms)


def test_report_escapes_plan_names(evil_path, tmp_path, capsys):
    out = tmp_path / "evil.html"
    rc, text, err = _run(capsys, evil_path, "--report", str(out))
    assert rc == 0, err
    raw, p = _parse(out)
    _self_contained(raw, p)
    assert "<script" not in raw and "<b>" not in raw
    names = [a["data-name"] for t, a in p.tags if t == "g" and a.get("class") in ("layer", "view")]
    assert EVIL in names  # the parser gives back the name the plan holds
    assert EVIL in text  # plain text output shows it as it is


def _repack(path, edit, out):
    """A copy of a plan with its header JSON changed by `edit` and a valid checksum."""
    data = open(path, "rb").read()
    _, version, flags, hlen = struct.unpack_from("<8sIIQ", data, 0)
    header = json.loads(data[24:24 + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    rest = data[24 + hlen:-32]
    body = struct.pack("<8sIIQ", b"KILNPLAN", version, flags, len(raw)) + raw + rest
    with open(out, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
    return str(out)


def test_control_characters_and_markup_in_names(plan_path, tmp_path, capsys):
    bad = "evil\x1b[2J\x07<img src=x onerror=alert(1)>"

    def edit(h):
        h["graph"]["steps"][0]["name"] = bad
        h["build"]["fused"] = {}
    path = _repack(plan_path, edit, tmp_path / "ctl.kiln")
    rc, text, err = _run(capsys, path, "--report", str(tmp_path / "ctl.html"))
    assert rc == 0, err
    assert "\x1b" not in text and "\x07" not in text and "evil\\x1b[2J\\x07<img" in text
    raw, p = _parse(tmp_path / "ctl.html")
    assert "\x1b" not in raw and "<img" not in raw and not [t for t, _ in p.tags if t == "img"]


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------------------------

def _refused(capsys, argv, *words):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("mutate, words", [
    (lambda d: b"NOTAPLAN" + d[8:], ("bad magic",)),
    (lambda d: d[: len(d) // 2], ("truncated",)),
    (lambda d: d[:20], ("truncated",)),
    (lambda d: d[:40] + bytes([d[40] ^ 0x20]) + d[41:], ("checksum",)),
    (lambda d: d[:8] + (99).to_bytes(4, "little") + d[12:], ("format version 99",)),
])
def test_corrupt_plans_refused(plan_path, tmp_path, capsys, mutate, words):
    bad = tmp_path / "bad.kiln"
    bad.write_bytes(mutate(open(plan_path, "rb").read()))
    report = tmp_path / "r.html"
    _refused(capsys, [str(bad), "--report", str(report)], *words)
    _refused(capsys, [str(bad), "--format", "json"], *words)
    assert not report.exists()


@pytest.mark.parametrize("edit, words", [
    (lambda h: h["graph"].__setitem__("steps", {"a": 1}), ("graph.steps", "expected a list")),
    (lambda h: h["graph"]["steps"][1].__setitem__("tactic", 7), ("graph.steps[1].tactic",)),
    (lambda h: h["build"].__setitem__("fused", {"first": "[[1, 2]"}), ("build.fused.first",)),
    (lambda h: h["memory"].__setitem__("arena_bytes", -1), ("memory.arena_bytes",)),
    (lambda h: h.pop("graph"), ("graph", "missing")),
])
def test_malformed_headers_refused(plan_path, tmp_path, capsys, edit, words):
    _refused(capsys, [_repack(plan_path, edit, tmp_path / "m.kiln")], *words)


def test_missing_plan_and_report_over_the_plan(plan_path, tmp_path, capsys):
    _refused(capsys, [str(tmp_path / "nope.kiln")], "not found")
    _refused(capsys, [plan_path, "--report", plan_path], "the plan itself")
    _refused(capsys, [plan_path, "--report", str(tmp_path / "no" / "dir" / "r.html")])
    assert os.path.getsize(plan_path) > 0 and load_plan(plan_path)


@pytest.mark.parametrize("content, words", [
    (b"{not json", ("not valid JSON",)),
    (b"[1, 2]", ("expected a JSON object",)),
    (json.dumps({"layers": [{"name": "first", "mean_ms": -1}]}).encode(), ("first", '"ms" must be')),
    (json.dumps({"layers": [{"name": "first", "mean_ms": 1, "percent": 250}]}).encode(), ("percent",)),
    (json.dumps({"layers": {"first": {"ms": "fast"}}}).encode(), ('"ms" must be',)),
    (json.dumps({"layers": [{"mean_ms": 1}]}).encode(), ("no layer name",)),
    (json.dumps({"layers": {"someone_else": {"ms": 1.0}}}).encode(), ("none of its 1 layers",)),
    (json.dumps({"layers": []}).encode(), ("no per-layer entries",)),
])
def test_bad_profiles_refused(plan_path, tmp_path, capsys, content, words):
    prof = tmp_path / "p.json"
    prof.write_bytes(content)
    report = tmp_path / "r.html"
    _refused(capsys, [plan_path, "--report", str(report), "--profile", str(prof)], "--profile", *words)
    assert not report.exists()
    _refused(capsys, [plan_path, "--profile", str(tmp_path / "missing.json")], "not found")


# ---- the graph layout ------------------------------------------------------------------------------------------

def test_layout_ranks_edges_down_and_keeps_boxes_apart():
    from kiln.plan.layout import layered
    rng = random.Random()
    for _ in range(20):
        n = rng.randint(1, 40)
        edges = [(rng.randrange(0, v), v) for v in range(1, n) for _ in range(rng.randint(1, 2))]
        widths = [rng.choice([150.0, 212.0]) for _ in range(n)]
        p = layered(widths, edges, height=52.0)
        for u, v, pts in p.edges:
            assert p.y[v] > p.y[u] and pts[0][1] < pts[-1][1]
            assert all(a[1] <= b[1] for a, b in zip(pts, pts[1:]))  # never climbs
        rows: dict[float, list[int]] = {}
        for i in range(n):
            rows.setdefault(p.y[i], []).append(i)
            assert widths[i] / 2 <= p.x[i] <= p.width - widths[i] / 2
        for row in rows.values():
            row.sort(key=lambda i: p.x[i])
            for a, b in zip(row, row[1:]):
                assert p.x[b] - p.x[a] >= (widths[a] + widths[b]) / 2 - 1e-6


def test_a_model_instead_of_a_plan_says_how_to_build_it(tmp_path, capsys):
    cfg = tmp_path / "net.cfg"
    cfg.write_text("# a Darknet network\n; another comment\n\n[net]\nwidth=8\nheight=8\nchannels=3\n")
    _refused(capsys, [str(cfg)], "not a Kiln plan file", "looks like a Darknet .cfg",
             "kiln build X.cfg --weights X.weights")
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(_model().SerializeToString())
    _refused(capsys, [str(onnx_path)], "looks like an ONNX model")
