"""The YOLO detection pipeline end to end on the CPU: `kiln build X.cfg --weights W --detect`, the letterbox, and
the sample scripts (examples/yolo_pipeline.py, examples/yolov4_tiny/detect.py).

The oracle is written here: a float64 numpy decode (Darknet's formulas: sigmoid/exp, grid, anchors,
scale_x_y, the letterbox undone) and a class-aware greedy NMS (rank by score then box then class, best
pre_nms_top_k, IoU > threshold suppresses, boxes of no area never overlap) applied to the raw head maps that
the plan *without* --detect computes for the same letterboxed image. The --detect plan must give the same
detections. Weights are random (examples/darknet_torch.py's writer, BN statistics set from a forward pass), the
image is drawn by the test.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from examples import yolo_pipeline as yp
from examples.darknet_torch import oracle_cfg, oracle_layers, random_params, write_weights
from kiln.cli.main import main as kiln_main
from kiln.errors import KilnError
from kiln.frontend.darknet import parse_darknet_cfg
from kiln.runtime.engine import Engine
from tests.conftest import ROOT
from tests.test_darknet import CFGS, CONV, NET, _setup

TINY = os.path.join(ROOT, "examples", "yolov4_tiny", "yolov4-tiny.cfg")
PRE_NMS_TOP_K = 4096  # BatchedNMS's default, which --detect keeps
MARGIN = 1e-6  # a decision this close to its threshold (relative) could go either way in float32


# ---- the oracle ----------------------------------------------------------------------------------------

def oracle_decode(maps: dict[str, np.ndarray], cfg: str, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [B, 4] x1 y1 x2 y2 in original-image pixels, scores [B, C]) in float64 from the raw maps of one
    image, rows anchor-major, then y, then x, heads in .cfg order. The [yolo] parameters are read here from
    the .cfg with the test's own parser."""
    secs = oracle_cfg(cfg)
    in_h, in_w = int(secs[0]["height"]), int(secs[0]["width"])
    yolos = [(i, s) for i, s in enumerate(secs[1:]) if s["type"] == "yolo"]
    sx, sy, px, py = (float(v) for v in lb)
    all_boxes, all_scores = [], []
    for i, s in yolos:
        mask = [int(v) for v in s["mask"].split(",")]
        a = [float(v) for v in s["anchors"].split(",")]
        anchors = np.array([(a[2 * m], a[2 * m + 1]) for m in mask], np.float64)
        scale = float(s.get("scale_x_y", 1.0))
        t = maps[f"yolo{i}"][0].astype(np.float64)
        c = t.shape[0] // len(mask) - 5
        h, w = t.shape[1:]
        t = t.reshape(len(mask), 5 + c, h, w)
        sig = 1.0 / (1.0 + np.exp(-t))
        gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
        cx = (sig[:, 0] * scale - (scale - 1) / 2 + gx) * in_w / w
        cy = (sig[:, 1] * scale - (scale - 1) / 2 + gy) * in_h / h
        bw = np.exp(t[:, 2]) * anchors[:, 0, None, None]
        bh = np.exp(t[:, 3]) * anchors[:, 1, None, None]
        boxes = np.stack([(cx - bw / 2 - px) / sx, (cy - bh / 2 - py) / sy,
                          (cx + bw / 2 - px) / sx, (cy + bh / 2 - py) / sy], -1)  # A, H, W, 4
        scores = (sig[:, 4:5] * sig[:, 5:]).transpose(0, 2, 3, 1)                   # A, H, W, C
        all_boxes.append(boxes.reshape(-1, 4))
        all_scores.append(scores.reshape(-1, c))
    return np.concatenate(all_boxes), np.concatenate(all_scores)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a with each row of b; 0 where either has no positive area."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    ok = (area_a > 0) & (area_b > 0) & (inter > 0)
    return np.where(ok, inter / np.where(ok, area_a + area_b - inter, 1.0), 0.0)


def oracle_nms(boxes: np.ndarray, scores: np.ndarray, conf: float, iou: float, max_det: int
               ) -> tuple[list[int], list[int], float]:
    """(box indices, classes, margin) of the kept detections by greedy class-aware NMS, best first. margin: how
    close the closest call was that float32 rounding could decide otherwise (relative): a score to conf, the
    scores at the pre_nms_top_k and max_det cuts, an IoU to the threshold, and the two scores where one
    candidate suppresses another (near-equal scores may rank either way)."""
    b, c = np.nonzero(scores > conf)
    s = scores[b, c]
    order = np.lexsort((c, b, -s))
    margin = float(np.min(np.abs(scores - conf)) / conf)
    if len(order) > PRE_NMS_TOP_K:
        margin = min(margin, float(s[order[PRE_NMS_TOP_K - 1]] / s[order[PRE_NMS_TOP_K]] - 1))
    order = order[:PRE_NMS_TOP_K]
    b, c, s = b[order], c[order], s[order]
    kept: list[int] = []  # ranks
    by_class: dict[int, list[int]] = {}
    for r in range(len(b)):
        same = by_class.setdefault(int(c[r]), [])
        if same:
            ious = _iou(boxes[b[r]], boxes[b[same]])
            live = ious > 0
            if live.any():
                margin = min(margin, float(np.min(np.abs(ious[live] - iou))))
            hit = ious > iou
            if hit.any():
                margin = min(margin, float(s[same][hit].min() / s[r] - 1))
                continue
        if len(kept) == max_det:  # the first candidate left out by the cap
            margin = min(margin, float(s[kept[-1]] / s[r] - 1))
            break
        kept.append(r)
        same.append(r)
    return [int(b[k]) for k in kept], [int(c[k]) for k in kept], margin


def assert_same_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, want_boxes: np.ndarray,
                           want_scores: np.ndarray, want_classes: np.ndarray) -> None:
    """Kiln's detections against the oracle's: the same scores in descending order and the same (class, box,
    score) set; detections of near-equal scores may come in either order."""
    assert len(scores) == len(want_scores)
    assert (np.diff(scores.astype(np.float64)) <= 0).all()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-7)
    free = np.ones(len(scores), bool)
    for wb, ws, wc in zip(want_boxes, want_scores, want_classes):
        ok = free & (classes == wc) & np.isclose(scores, ws, rtol=1e-5, atol=1e-7) \
            & np.isclose(boxes, wb, rtol=1e-5, atol=2e-3).all(axis=1)
        assert ok.any(), f"no detection of class {wc}, score {ws:.6f}, box {wb.round(3).tolist()} in Kiln's"
        free[np.argmax(ok)] = False


# ---- fixtures ------------------------------------------------------------------------------------------

def drawn_image(width: int, height: int, seed: int) -> Image.Image:
    """The test's own picture: noise-textured background, random filled rectangles and ellipses."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 110, (height, width, 3), dtype=np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for k in range(6):
        x0, y0 = int(rng.integers(0, width // 2 + 1)), int(rng.integers(0, height // 2 + 1))
        x1, y1 = x0 + int(rng.integers(1, width // 2 + 2)), y0 + int(rng.integers(1, height // 2 + 2))
        col = tuple(int(v) for v in rng.integers(0, 110, 3))
        (d.rectangle if k % 2 else d.ellipse)([x0, y0, x1, y1], fill=col)
    return img


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """get(cfg, conf, iou, max_det): random weights for the .cfg, the raw-head plan and the --detect plan, each
    built once by `kiln build` (CPU, optimization level 0)."""
    made: dict = {}

    def get(cfg: str, conf: float, iou: float, max_det: int) -> dict:
        if cfg not in made:
            tmp = tmp_path_factory.mktemp("yolo")
            _, _, weights = _setup(tmp, cfg, seed=5)
            raw = str(tmp / "raw.kiln")
            assert kiln_main(["build", cfg, "-o", raw, "--weights", weights, "--device", "cpu", "--opt-level", "0",
                              "-q"]) == 0
            made[cfg] = {"weights": weights, "raw": raw, "tmp": tmp}
        key = (cfg, conf, iou, max_det)
        if key not in made:
            base = made[cfg]
            det = str(base["tmp"] / f"det{len(made)}.kiln")
            assert kiln_main(["build", cfg, "-o", det, "--weights", base["weights"], "--device", "cpu",
                              "--opt-level", "0", "-q", "--detect", "--conf", str(conf), "--iou", str(iou),
                              "--max-det", str(max_det)]) == 0
            made[key] = {**base, "det": det}
        return made[key]
    return get


# ---- --detect against the oracle -----------------------------------------------------------------------

@pytest.mark.parametrize("cfg,conf,iou,max_det,size,seed", [
    (TINY, 0.5, 0.45, 4000, (500, 300), 11),                          # the best 4096 of ~7.7k candidates
    (TINY, 0.3, 0.6, 60, (300, 460), 12),                             # ~61k candidates, capped at 60
    (os.path.join(CFGS, "features.cfg"), 0.2, 0.5, 300, (90, 70), 13),  # 37x29 input, scale_x_y 1.1, no cap
])
def test_detect_plan_matches_oracle(built, cfg, conf, iou, max_det, size, seed):
    b = built(cfg, conf, iou, max_det)
    raw, det = Engine.load(b["raw"]), Engine.load(b["det"])
    assert det.output_names == ["num_detections", "det_boxes", "det_scores", "det_classes"]
    assert det.input_names == ["input", "letterbox"]
    _, _, h, w = raw.plan.inputs[0]["shape"]
    # The raw maps differ in the last bits from one CPU's kernels to another's, so whether a drawn picture puts
    # a decision within MARGIN of its threshold depends on the machine: draw until one is clear of all of them.
    for draw in range(8):
        canvas, lb = yp.letterbox(drawn_image(*size, seed + 1000 * draw), h, w)
        x = canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255
        maps = raw.create_execution_context().execute({"input": x})
        boxes, scores = oracle_decode(maps, cfg, lb)
        keep, classes, margin = oracle_nms(boxes, scores, conf, iou, max_det)
        if margin > MARGIN:
            break
    assert margin > MARGIN, f"8 drawn cases each have a decision within {MARGIN:.0e} of its threshold"
    got = det.create_execution_context().execute({"input": x, "letterbox": lb[None]})
    n = int(got["num_detections"][0, 0])
    print(f"{os.path.basename(cfg)}: {int((scores > conf).sum())} candidates, {n} detections (max {max_det})")
    assert n == len(keep) > 0
    assert got["det_boxes"].shape == (1, max_det, 4) and got["det_scores"].shape == (1, max_det)
    assert_same_detections(got["det_boxes"][0, :n], got["det_scores"][0, :n], got["det_classes"][0, :n],
                           boxes[keep], scores[keep, classes], np.array(classes))
    for name in ("det_boxes", "det_scores", "det_classes"):  # zero beyond num_detections
        assert not np.asarray(got[name])[0, n:].any()
    # the letterbox input is read per run: another one moves every box as (x - pad) / scale says
    other = np.array([[lb[0] * 2, lb[1] * 0.5, lb[2] + 3, lb[3] - 5]], np.float32)
    moved = det.create_execution_context().execute({"input": x, "letterbox": other})
    np.testing.assert_array_equal(moved["det_classes"], got["det_classes"])  # the same run but for the boxes
    net_xy = got["det_boxes"][0, :n].astype(np.float64) * np.tile(lb[:2], 2) + np.tile(lb[2:], 2)
    want = (net_xy - np.tile(other[0, 2:], 2)) / np.tile(other[0, :2], 2)
    np.testing.assert_allclose(moved["det_boxes"][0, :n], want, rtol=1e-4, atol=1e-2)
    assert (n == max_det) == (max_det == 60), "only the capped case reaches its cap"


# ---- letterbox ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,net", [((640, 480), (416, 416)), ((300, 700), (416, 416)), ((50, 40), (37, 29)),
                                      ((1000, 9), (608, 608))])
def test_letterbox(size, net):
    img = drawn_image(*size, seed=size[0])  # pixel values < 110: the 114 padding is told apart
    h, w = net
    canvas, lb = yp.letterbox(img, h, w)
    assert canvas.shape == (h, w, 3) and canvas.dtype == np.uint8
    rows = np.nonzero((canvas != yp.GRAY).any(axis=(1, 2)))[0]
    cols = np.nonzero((canvas != yp.GRAY).any(axis=(0, 2)))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    nw, nh = x1 - x0, y1 - y0
    assert (canvas[y0:y1, x0:x1] != yp.GRAY).any(axis=2).all()  # the picture is one solid block
    assert nw == w or nh == h  # it fills one side
    assert abs(nw / size[0] - nh / size[1]) <= 0.5 / min(size) + 1e-12  # one scale, up to rounding a side
    assert abs(x0 - (w - x1)) <= 1 and abs(y0 - (h - y1)) <= 1  # centred
    np.testing.assert_allclose(lb, [nw / size[0], nh / size[1], x0, y0], rtol=1e-6)
    want = np.asarray(img.resize((int(nw), int(nh)), Image.BILINEAR))
    np.testing.assert_array_equal(canvas[y0:y1, x0:x1], want)


# ---- the sample ----------------------------------------------------------------------------------------

def test_sample_end_to_end(built, tmp_path, capsys):
    """The sample with given weights on a PNG the test writes: its detections are the oracle's on the raw plan's
    maps for the letterbox it reports; the PNG is the original's size with the boxes drawn on it."""
    b = built(TINY, 0.5, 0.45, 4000)  # the weights and the raw plan (the sample builds its own plan)
    src = drawn_image(500, 300, seed=11)
    image, out, plan = tmp_path / "in.png", tmp_path / "boxes.png", tmp_path / "p.kiln"
    src.save(image)
    args = ["--weights", b["weights"], "--image", str(image), "--device", "cpu", "--opt-level", "0", "--runs", "2",
            "--conf", "0.75", "--iou", "0.45", "--max-det", "100", "--plan", str(plan), "--out", str(out)]
    res = yp.run(args, "YOLOv4-tiny", TINY)
    text = capsys.readouterr().out
    assert "RANDOM" not in text and f"plan: {plan} (built in" in text
    raw = Engine.load(b["raw"])
    canvas, lb = yp.letterbox(src, 416, 416)
    np.testing.assert_array_equal(res.letterbox[0], lb)
    maps = raw.create_execution_context().execute({"input": canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255})
    boxes, scores = oracle_decode(maps, TINY, lb)
    keep, classes, _ = oracle_nms(boxes, scores, 0.75, 0.45, 100)
    d = res.detections
    assert_same_detections(d.boxes, d.scores, d.classes, boxes[keep], scores[keep, classes], np.array(classes))
    for stage in (*yp.STAGES, "total"):
        m = re.search(rf"^  {stage} +([0-9.]+) ms", text, re.M)
        assert m and float(m.group(1)) == pytest.approx(res.stages_ms[stage], abs=0.006), stage
    assert res.stages_ms["inference"] > 0 and res.stages_ms["total"] >= res.stages_ms["inference"]

    png = Image.open(out)
    png.verify()
    png = Image.open(out).convert("RGB")
    assert png.size == src.size
    pix = np.asarray(png).astype(int)
    orig = np.asarray(src).astype(int)
    assert (pix != orig).any(axis=2).mean() > 0.001  # something was drawn
    # the saved PNG is the original with exactly these detections drawn
    again, drawn = yp.draw_detections(src, res.detections, yp.COCO_NAMES)
    assert drawn == res.drawn and np.array_equal(np.asarray(again), pix.astype(np.uint8))
    # and, independently of the drawing code: a box's bottom edge has its class's colour where nothing drawn
    # after it (a later box or its label, within 40 pixels above it) can cover it, and pixels far from every
    # box are the original's
    boxes = res.detections.boxes
    checked = 0
    for k in range(len(boxes) - 1, -1, -1):
        x1, y1, x2, y2 = boxes[k]
        if not (2 <= x1 and x2 <= src.size[0] - 3 and 2 <= y1 and y2 <= src.size[1] - 3 and x2 - x1 > 8 < y2 - y1):
            continue
        later = boxes[k + 1:]  # a later box, or its label: up to 40 pixels above it, 200 wide, inside the image
        left = np.minimum(later[:, 0], src.size[0] - 200)
        if ((left <= x2 + 3) & (np.maximum(later[:, 2], later[:, 0] + 200) >= x1 - 3)
                & (later[:, 1] - 40 <= y2 + 3) & (later[:, 3] >= y2 - 3)).any():
            continue
        color = np.array(yp.class_color(int(res.detections.classes[k])))
        edge = pix[int(y2) - 3:int(y2) + 2, int((x1 + x2) / 2)]
        assert (edge == color).all(axis=1).any(), f"box {k}: no {color.tolist()} pixel on its bottom edge"
        checked += 1
    assert checked, "no box could be checked on this image"
    near = np.zeros(pix.shape[:2], bool)
    for x1, y1, x2, y2 in boxes:
        near[max(0, int(y1) - 40):max(0, int(y2) + 4),
             max(0, min(int(x1), src.size[0] - 200) - 4):max(0, int(x2) + 200)] = True
    assert (~near).any() and np.array_equal(pix[~near], orig[~near])

    # again: the cached plan is loaded, not rebuilt, and gives the same detections
    res2 = yp.run(args, "YOLOv4-tiny", TINY)
    assert f"plan: {plan} (loaded the cached plan" in capsys.readouterr().out
    np.testing.assert_array_equal(res2.detections.boxes, res.detections.boxes)


def test_sample_uses_a_given_plan(built, tmp_path, capsys):
    """--plan naming a plan of `kiln build --detect` (no sidecar) runs it as it is; a raw-head plan is refused."""
    b = built(TINY, 0.3, 0.6, 60)
    src = drawn_image(300, 460, seed=12)
    src.save(tmp_path / "in.png")
    common = ["--weights", b["weights"], "--image", str(tmp_path / "in.png"), "--device", "cpu", "--runs", "1",
              "--out", str(tmp_path / "o.png")]
    res = yp.run([*common, "--plan", b["det"]], "YOLOv4-tiny", TINY)
    assert "loaded as given" in capsys.readouterr().out
    canvas, lb = yp.letterbox(src, 416, 416)
    want = Engine.load(b["det"]).create_execution_context().execute(
        {"input": canvas.transpose(2, 0, 1)[None].astype(np.float32) / 255, "letterbox": lb[None]})
    assert len(res.detections.scores) == 60  # the plan's own --max-det, not the sample's default 100
    np.testing.assert_array_equal(res.detections.boxes, want["det_boxes"][0].astype(np.float64))
    assert yp.main([*common, "--plan", b["raw"]], "YOLOv4-tiny", TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a detection plan of this sample (inputs input; outputs yolo30, yolo37)" in err[0]


def test_sample_script_random_weights(tmp_path):
    """examples/yolov4_tiny/detect.py as a user runs it: random weights, the drawn test image."""
    out = tmp_path / "boxes.png"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # its random weights and plan cache go under tmp_path
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "yolov4_tiny", "detect.py"), "--device", "cpu",
                        "--opt-level", "0", "--runs", "3", "--out", str(out)], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=300)
    print(r.stdout)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights (seed 0" in r.stdout and "meaningless" in r.stdout
    assert str(tmp_path) in re.search(r"^plan: (\S+)", r.stdout, re.M).group(1)
    table = dict(re.findall(r"^  (\w+) +([0-9.]+) ms", r.stdout, re.M))
    assert set(table) == {*yp.STAGES, "total"} and float(table["inference"]) > 0
    n = int(re.search(r"^(\d+) detections", r.stdout, re.M).group(1))
    assert re.search(rf"wrote {re.escape(str(out))} \(640x480, \d+ boxes drawn\)", r.stdout)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (640, 480)
    assert 0 < n <= 100


@pytest.mark.parametrize("args,expect", [
    (["--image", "missing.png"], "--image missing.png: file not found"),
    (["--image", "NOTIMAGE"], "cannot read it as an image"),
    (["--size", "100"], "--size must be a positive multiple of 32"),
    (["--conf", "1.5"], "--conf must be a score threshold in [0, 1)"),
    (["--max-det", "0"], "--max-det must be an integer in 1..65536"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--cfg", "nope.cfg"], "Darknet .cfg not found: nope.cfg"),
])
def test_sample_errors(tmp_path, capsys, monkeypatch, args, expect):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTIMAGE").write_bytes(b"not a picture")
    rc = yp.main([*args, "--device", "cpu", "--out", str(tmp_path / "o.png")], "YOLOv4-tiny", TINY)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("detect.py: error: ") and expect in err[0], err
    assert not (tmp_path / "o.png").exists()


# ---- kiln build --detect errors ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["onnx", "flag without detect", "conf", "iou", "max-det", "no yolo layers"])
def test_detect_flag_errors(tmp_path, capsys, light_dir, case):
    cfg = tmp_path / "plain.cfg"
    cfg.write_text(NET + CONV)
    weights = str(tmp_path / "plain.weights")
    layers = oracle_layers(oracle_cfg(str(cfg)))
    write_weights(weights, layers, random_params(layers, np.random.default_rng(0)))
    out = tmp_path / "out.kiln"
    model, extra, expect = str(cfg), ["--weights", weights, "--detect"], None
    if case == "onnx":
        model, extra = os.path.join(light_dir, "light_resnet50.onnx"), ["--detect"]
        expect = "--detect goes with a Darknet .cfg model"
    elif case == "flag without detect":
        extra = ["--weights", weights, "--iou", "0.5"]
        expect = "--conf, --iou and --max-det go with --detect"
    elif case == "conf":
        extra += ["--conf", "1.5"]
        expect = "--conf must be a score threshold in [0, 1), got 1.5"
    elif case == "iou":
        extra += ["--iou", "nan"]
        expect = "--iou must be an IoU threshold in [0, 1], got nan"
    elif case == "max-det":
        extra += ["--max-det", "0"]
        expect = "--max-det must be an integer in 1..65536, got 0"
    else:
        expect = "--detect needs a network with [yolo] layers; this one has none"
    rc = kiln_main(["build", model, "-o", str(out), "--device", "cpu", "--opt-level", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("kiln: error: ") and expect in err[-1], err
    assert "Traceback" not in "\n".join(err) and not out.exists()


def test_sample_cfgs_are_the_tested_ones():
    """The samples' .cfg files are the ones tests/test_darknet.py checks against torch and ONNX."""
    for sample, tested in ((TINY, "yolov4-tiny.cfg"), (os.path.join(ROOT, "examples", "yolov4", "yolov4.cfg"),
                                                         "yolov4.cfg")):
        assert open(sample, "rb").read() == open(os.path.join(CFGS, tested), "rb").read()
        assert [h.output for h in parse_darknet_cfg(sample).heads]


def test_png_written_atomically(tmp_path):
    img = drawn_image(20, 10, seed=1)
    yp.save_png(img, str(tmp_path / "a.png"))
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (20, 10) and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(img))
    assert os.listdir(tmp_path) == ["a.png"]
    with pytest.raises(KilnError, match="cannot write image"):
        yp.save_png(img, str(tmp_path / "missing" / "b.png"))
