"""Calibrators and the calibration cache against plain numpy float64 oracles on seeded random data."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kiln.errors import CalibrationError, KilnError
from kiln.quant import cache as cache_mod
from kiln.quant.cache import read_cache, write_cache
from kiln.quant.calibrators import (CALIBRATORS, Histogram, entropy_threshold, kl_divergences, make_calibrator,
                                    mse_errors, mse_threshold, percentile_threshold)

BINS = 2048


def _sample(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=n).astype(np.float32)
    return rng.uniform(-3.0, 3.0, size=n).astype(np.float32)


def _histogram(x: np.ndarray) -> Histogram:
    cal = make_calibrator("entropy")
    cal.observe("t", torch.from_numpy(x))
    return cal.histograms["t"]


# ---------------------------------------------------------------- oracles (plain numpy float64)

def kl_oracle_bin(h: np.ndarray) -> int:
    """TensorRT's KL search: the argmin bin count i."""
    return 128 + int(np.argmin(kl_oracle(h)))


def kl_oracle(h: np.ndarray) -> list[float]:
    """KL(P || Q) written out candidate by candidate, i = 128 .. len(h)."""
    divergences = []
    for i in range(128, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        group = np.arange(i) * 128 // i
        nonempty = h[:i] > 0
        group_sum = np.bincount(group, weights=h[:i], minlength=128)
        group_nonempty = np.bincount(group, weights=nonempty.astype(np.float64), minlength=128)
        q = np.zeros(i)
        q[nonempty] = group_sum[group[nonempty]] / group_nonempty[group[nonempty]]
        p = p / p.sum()
        q = q / q.sum() if q.sum() > 0 else q
        mask = p > 0
        qq = np.where(q[mask] == 0, 1e-12, q[mask])
        divergences.append(float(np.sum(p[mask] * np.log(p[mask] / qq))))
    return divergences


def mse_oracle(h: np.ndarray) -> list[float]:
    """Mean squared int8 error for amax = k bins (k = 128 .. len(h)), counts uniform inside each bin (width 1),
    integrated exactly piece by piece: (x - c)**2 between rounding breakpoints, (x - k)**2 above k."""
    out = []
    for k in range(128, len(h) + 1):
        s = k / 127.0
        total = 0.0
        for j in np.flatnonzero(h):
            a, b = float(j), float(j + 1)
            if a >= k:
                cost = ((b - k) ** 3 - (a - k) ** 3) / 3.0
            else:
                cost = 0.0
                for m in range(int(np.floor(a / s + 0.5)), int(np.floor(b / s + 0.5)) + 1):
                    lo, hi = max(a, (m - 0.5) * s), min(b, (m + 0.5) * s)
                    if hi > lo:
                        cost += ((hi - m * s) ** 3 - (lo - m * s) ** 3) / 3.0
            total += h[j] * cost
        out.append(total / h.sum())
    return out


def percentile_oracle(h: np.ndarray, width: float, p: float) -> float:
    """Walk the bins until p % of the mass is reached, interpolating linearly inside the bin."""
    target = p / 100.0 * h.sum()
    below = 0.0
    for b, c in enumerate(h):
        if c > 0 and below + c >= target:
            return (b + (target - below) / c) * width
        below += c
    return len(h) * width


def _random_histograms(seed: int, n: int) -> list[np.ndarray]:
    """Smooth, sparse, zero-spiked, heavy-tailed and all-mass-high histograms of `n` bins."""
    rng = np.random.default_rng(seed)
    j = np.arange(n)
    smooth = np.floor(1e4 * np.exp(-((j / (n * rng.uniform(0.1, 0.4))) ** 2)))
    sparse = rng.integers(0, 50, n) * (rng.random(n) < 0.3)
    spiked = smooth.copy()
    spiked[0] += 1e5
    tail = rng.poisson(2e4 / (1.0 + j) ** 1.5).astype(np.float64)
    tail[-1] += 3
    high = np.zeros(n)
    high[n - 20:] = rng.integers(1, 100, 20)
    return [h.astype(np.float64) for h in (smooth, sparse, spiked, tail, high)]


def int8_sq_error(a: np.ndarray, amax: float) -> float:
    """Mean squared error of symmetric int8 quantization of magnitudes `a` with range `amax`."""
    s = amax / 127.0
    return float(np.mean((a - np.minimum(np.round(a / s), 127.0) * s) ** 2))


def bins_f32(a32: np.ndarray, rng_: float) -> np.ndarray:
    """The documented bin rule, in float32 as the collector computes it."""
    scale = np.float32(BINS) / np.float32(rng_)
    idx = np.clip(np.ceil(a32 * scale) - 1, 0, BINS - 1).astype(np.int64)
    return np.bincount(idx, minlength=BINS).astype(np.float64)


# ---------------------------------------------------------------- factory and input checks

def test_make_calibrator_names_and_unknown():
    for name in CALIBRATORS:
        assert make_calibrator(name).name == name
    with pytest.raises(CalibrationError) as e:
        make_calibrator("kl")
    msg = str(e.value)
    assert "'kl'" in msg and all(n in msg for n in CALIBRATORS) and "\n" not in msg
    for bad in (0.0, -1.0, 100.5, float("nan"), "99"):
        with pytest.raises(CalibrationError):
            make_calibrator("percentile", bad)


@pytest.mark.parametrize("name", CALIBRATORS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_names_the_tensor(name, bad):
    x = torch.from_numpy(_sample("normal", 1000, 3))
    x[17] = bad
    cal = make_calibrator(name)
    cal.observe("ok", torch.randn(10, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(CalibrationError, match="conv1.out"):
        cal.observe("conv1.out", x)
    with pytest.raises(KilnError, match="conv1.out"):
        cal.observe("conv1.out", x.half())


def test_integer_tensor_refused():
    with pytest.raises(CalibrationError, match="t0"):
        make_calibrator("minmax").observe("t0", torch.arange(5))


# ---------------------------------------------------------------- minmax

@pytest.mark.parametrize("seed", range(3))
def test_minmax_exact_and_streaming_equals_concatenated(seed):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((rng.integers(1, 5), 7, 3)).astype(np.float32) * rng.uniform(0.1, 10)
               for _ in range(5)]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        streamed, whole = make_calibrator("minmax"), make_calibrator("minmax")
        for b in batches:
            streamed.observe("a", torch.from_numpy(b).to(dtype))
        cat = torch.from_numpy(np.concatenate(batches)).to(dtype)
        whole.observe("a", cat)
        oracle = float(np.max(np.abs(cat.double().numpy())))
        assert streamed.amax() == {"a": oracle} == whole.amax()


def test_all_zero_and_empty_tensors_give_zero():
    for name in CALIBRATORS:
        cal = make_calibrator(name)
        cal.observe("z", torch.zeros(100))
        cal.observe("e", torch.zeros(0))
        assert cal.amax() == {"z": 0.0, "e": 0.0}


# ---------------------------------------------------------------- histogram collector

@pytest.mark.parametrize("seed", range(4))
def test_range_growth_equals_one_histogram_at_final_range(seed):
    rng = np.random.default_rng(seed)
    scales = np.sort(rng.uniform(0.05, 40.0, size=6))
    batches = [np.zeros(37, np.float32)] + [(rng.standard_normal(8000) * s).astype(np.float32) for s in scales]
    cal = make_calibrator("mse")
    for b in batches:
        cal.observe("t", torch.from_numpy(b))
    h = cal.histograms["t"]
    a32 = np.abs(np.concatenate(batches))
    first_max = float(np.max(np.abs(batches[1])))
    doublings = np.log2(h.range / first_max)
    # the range is the first nonzero batch's max doubled the fewest times that hold every value
    assert doublings == round(doublings) and h.range >= a32.max() and h.range / 2 < a32.max()
    assert h.counts.sum() == a32.size
    np.testing.assert_array_equal(h.counts, bins_f32(a32, h.range))
    # and agrees with the real-number bin rule but for float32 rounding at bin edges
    a64 = a32.astype(np.float64)
    exact = np.bincount(np.clip(np.ceil(a64 * BINS / h.range) - 1, 0, BINS - 1).astype(np.int64), minlength=BINS)
    assert np.abs(h.counts - exact).sum() <= 2e-3 * a32.size


def test_first_max_is_in_the_last_bin_and_no_growth_at_equal_max():
    x = _sample("laplace", 5000, 11)
    h = _histogram(x)
    assert h.range == float(np.abs(x).max()) and h.counts[-1] >= 1
    before = h.counts.copy()
    h.add(torch.from_numpy(np.abs(x)), h.range)  # a batch whose max equals the range: no growth
    np.testing.assert_array_equal(h.counts, 2 * before)


# ---------------------------------------------------------------- percentile

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["normal", "laplace", "uniform"])
def test_percentile_within_one_bin(seed, kind):
    x = _sample(kind, 40_001, seed)
    a = np.abs(x.astype(np.float64))
    for p in (50.0, 90.0, 99.0, 99.9, 99.99, 100.0):
        cal = make_calibrator("percentile", p)
        cal.observe("t", torch.from_numpy(x[:15000]))
        cal.observe("t", torch.from_numpy(x[15000:]))
        got = cal.amax()["t"]
        width = cal.histograms["t"].width
        # "inverted_cdf": the smallest sample with p % of the samples at or below it (the calibrator's definition)
        want = float(np.percentile(a, p, method="inverted_cdf"))
        assert abs(got - want) <= width * (1 + 1e-6), (p, got, want, width)


@pytest.mark.parametrize("seed", range(3))
def test_percentile_interpolates_inside_the_bin(seed):
    for h in _random_histograms(seed, 700):
        for p in (1.0, 37.5, 50.0, 99.0, 99.99, 100.0):
            assert percentile_threshold(h, 0.125, p) == pytest.approx(percentile_oracle(h, 0.125, p), rel=1e-12)


# ---------------------------------------------------------------- entropy

@pytest.mark.parametrize("seed", range(2))
def test_kl_curve_matches_oracle(seed):
    for h in _random_histograms(seed, 300 + 97 * seed):
        np.testing.assert_allclose(kl_divergences(h), kl_oracle(h), rtol=1e-9, atol=1e-12)
        assert entropy_threshold(h, 0.5) == (kl_oracle_bin(h) + 0.5) * 0.5

@pytest.mark.parametrize("seed", range(3))
def test_entropy_matches_oracle_on_normal_data(seed):
    x = _sample("normal", 100_000, seed)
    h = _histogram(x)
    got = make_calibrator("entropy")
    got.observe("t", torch.from_numpy(x))
    amax = got.amax()["t"]  # the KL threshold, never past the largest |x|
    assert amax == pytest.approx(min((kl_oracle_bin(h.counts) + 0.5) * h.width, float(np.abs(x).max())), rel=1e-12)
    assert 2.0 < amax < 4.5  # N(0, 1): well inside the sample range, clipping a small tail


def test_entropy_ignores_a_few_huge_outliers():
    x = _sample("normal", 100_000, 5)
    x[[3, 500, 9000]] = [1000.0, -1000.0, 800.0]
    cal = make_calibrator("entropy")
    cal.observe("t", torch.from_numpy(x))
    h = cal.histograms["t"]
    amax = cal.amax()["t"]
    assert amax == pytest.approx((kl_oracle_bin(h.counts) + 0.5) * h.width, rel=1e-12)
    assert amax < 100.0  # far below the outliers (the search starts at 128 of 2048 bins, ~62 here)


def test_entropy_streaming_with_growth_matches_oracle():
    rng = np.random.default_rng(8)
    batches = [(rng.standard_normal(20000) * s).astype(np.float32) for s in (0.5, 1.0, 3.0)]
    cal = make_calibrator("entropy")
    for b in batches:
        cal.observe("t", torch.from_numpy(b))
    h = cal.histograms["t"]
    peak = max(float(np.abs(b).max()) for b in batches)
    assert cal.amax()["t"] == pytest.approx(min((kl_oracle_bin(h.counts) + 0.5) * h.width, peak), rel=1e-12)


# ---------------------------------------------------------------- mse

def test_mse_curve_matches_piecewise_oracle():
    for h in _random_histograms(4, 200):
        want = mse_oracle(h)
        np.testing.assert_allclose(mse_errors(h), want, rtol=1e-9, atol=1e-12)
        assert mse_threshold(h, 0.25) == (128 + int(np.argmin(want))) * 0.25

@pytest.mark.parametrize("kind,seed", [("normal", 0), ("laplace", 5), ("uniform", 3)])
def test_mse_matches_brute_force_on_samples(kind, seed):
    # 100k samples: the error curve is flat near its minimum (0.03 % over 40 bins at 30k samples), so fewer
    # samples let histogram-vs-sample differences move the argmin by more than a couple of bins
    x = _sample(kind, 100_000, seed)
    a = np.abs(x.astype(np.float64))
    cal = make_calibrator("mse")
    cal.observe("t", torch.from_numpy(x))
    width = cal.histograms["t"].width
    got_bin = cal.amax()["t"] / width
    assert got_bin == pytest.approx(round(got_bin), abs=1e-6)  # a candidate bin edge
    errors = [int8_sq_error(a, k * width) for k in range(128, BINS + 1)]
    best_bin = 128 + int(np.argmin(errors))
    assert abs(round(got_bin) - best_bin) <= 4, (got_bin, best_bin)
    assert errors[round(got_bin) - 128] <= 1.001 * min(errors)


def test_calibrators_are_deterministic():
    x = torch.from_numpy(_sample("laplace", 20000, 9))
    for name in CALIBRATORS:
        runs = []
        for _ in range(2):
            cal = make_calibrator(name)
            cal.observe("a", x[:7000])
            cal.observe("a", x[7000:] * 3)
            runs.append(cal.amax())
        assert runs[0] == runs[1] and runs[0]["a"] > 0


# ---------------------------------------------------------------- cache

def _ranges(seed: int, n: int = 50) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {f"layer{int(i)}/out\u00e9:{j}": float(v) for j, (i, v) in
            enumerate(zip(rng.integers(0, 10**6, n), rng.exponential(3.0, n)))}


def test_cache_round_trip(tmp_path):
    ranges = _ranges(0)
    ranges["zero"] = 0.0
    path = tmp_path / "model.calib"
    write_cache(path, ranges, "entropy", "sha256:abc")
    got, calibrator = read_cache(path, "sha256:abc")
    assert got == ranges and calibrator == "entropy"
    assert list(got) == sorted(ranges)
    assert read_cache(str(path)) == (got, "entropy")
    text = path.read_text()
    doc = json.loads(text)
    assert doc["version"] == cache_mod.VERSION and doc["model_digest"] == "sha256:abc"
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    assert os.listdir(tmp_path) == ["model.calib"]


def test_cache_wrong_digest(tmp_path):
    path = tmp_path / "c.json"
    write_cache(path, _ranges(1), "mse", "digest-A")
    with pytest.raises(CalibrationError, match="another model") as e:
        read_cache(path, "digest-B")
    assert str(path) in str(e.value)


def test_cache_unwritable_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker / "c.json", tmp_path / "missing" / "c.json", tmp_path):
        with pytest.raises(CalibrationError) as e:
            write_cache(target, _ranges(2), "minmax", "d")
        assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("ranges", [{"a": -1.0}, {"a": float("nan")}, {"a": float("inf")}, {"a": True},
                                    {"a": "1"}, {"": 1.0}, {"x" * 4097: 1.0}, {3: 1.0}])
def test_cache_write_refuses_bad_ranges(tmp_path, ranges):
    path = tmp_path / "c.json"
    write_cache(path, {"old": 1.0}, "percentile", "d")
    with pytest.raises(CalibrationError):
        write_cache(path, ranges, "percentile", "d")
    assert read_cache(path) == ({"old": 1.0}, "percentile")  # the old file is untouched
    with pytest.raises(CalibrationError):
        write_cache(path, {"a": 1.0}, "kl", "d")


def _doc(**over):
    doc = {"format": "kiln-calibration-cache", "version": 1, "calibrator": "entropy", "model_digest": "d",
           "ranges": {"a": 1.5, "b": 0.25}}
    doc.update(over)
    return json.dumps(doc)


CRAFTED = {
    "version 2": _doc(version=2),
    "version string": _doc(version="1"),
    "version bool": _doc(version=True),
    "no version": json.dumps({"format": "kiln-calibration-cache", "calibrator": "entropy", "model_digest": "d",
                              "ranges": {}}),
    "foreign format": _doc(format="kiln-timing-cache"),
    "negative": _doc(ranges={"a": -0.5}),
    "nan token": _doc(ranges={"a": 1.0}).replace("1.0", "NaN"),
    "infinity token": _doc(ranges={"a": 1.0}).replace("1.0", "Infinity"),
    "overflowing float": _doc(ranges={"a": 1.0}).replace("1.0", "1e999"),
    "huge int": _doc(ranges={"a": 1.0}).replace("1.0", "9" * 5000),
    "string value": _doc(ranges={"a": "1.0"}),
    "bool value": _doc(ranges={"a": True}),
    "null value": _doc(ranges={"a": None}),
    "list": "[1, 2]",
    "string": '"ranges"',
    "number": "3",
    "ranges a list": _doc(ranges=[1.0]),
    "long name": _doc(ranges={"n" * 4097: 1.0}),
    "empty name": _doc(ranges={"": 1.0}),
    "unknown calibrator": _doc(calibrator="kl"),
    "extra key": _doc(extra=1),
    "digest not a string": _doc(model_digest=7),
    "duplicate key": '{"a": 1, "a": 2}',
    "truncated": _doc()[:-7],
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_cache_files_refused(tmp_path, case):
    path = tmp_path / "bad.json"
    path.write_text(CRAFTED[case])
    with pytest.raises(CalibrationError) as e:
        read_cache(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg


def test_crafted_binary_huge_and_not_a_file(tmp_path):
    bad = tmp_path / "bin.json"
    bad.write_bytes(b'{"\xff": 1}')
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: costs no disk, must be refused without being read
        f.truncate(cache_mod.MAX_BYTES + 1)
    for path in (bad, huge, tmp_path, tmp_path / "missing.json"):
        with pytest.raises(CalibrationError) as e:
            read_cache(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_too_many_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MAX_ENTRIES", 10)
    path = tmp_path / "c.json"
    path.write_text(_doc(ranges={f"t{i}": 1.0 for i in range(11)}))
    with pytest.raises(CalibrationError, match="limit"):
        read_cache(path)
    with pytest.raises(CalibrationError, match="limit"):
        write_cache(tmp_path / "d.json", {f"t{i}": 1.0 for i in range(11)}, "minmax", "d")
    assert not (tmp_path / "d.json").exists()


def test_entropy_skips_exact_zeros():
    # a padded image: three quarters exact zeros, the rest uniform on (0, 1]; counting the zeros made the KL
    # search clip at 0.06 (one spike at 0 dominates P)
    rng = np.random.default_rng(11)
    img = np.zeros((64, 16, 16), dtype=np.float32)
    img[:, 4:12, 4:12] = rng.uniform(0.01, 1.0, (64, 8, 8)).astype(np.float32)
    cal = make_calibrator("entropy")
    cal.observe("img", torch.from_numpy(img))
    nz = img[img > 0]
    h = _histogram(nz)
    assert cal.amax()["img"] == pytest.approx(min((kl_oracle_bin(h.counts) + 0.5) * h.width, float(nz.max())),
                                              rel=1e-12)
    assert cal.amax()["img"] > 0.9


def test_clone_graph_of_a_deep_graph() -> None:
    """The INT8 report and speed selection copy the float graph (kiln.quant.report.clone_graph): a chain of 5000
    nodes (BERT-base has ~900) copies without exhausting Python's recursion limit, into an independent graph."""
    from kiln.ir.dtype import DType
    from kiln.ir.graph import Graph, Node, Value
    from kiln.ir.types import TensorType
    from kiln.quant.report import clone_graph
    g = Graph("deep")
    v = Value("x", TensorType(DType.FLOAT32, (4,)))
    g.inputs.append(v)
    for i in range(5000):
        out = Value(f"v{i}", TensorType(DType.FLOAT32, (4,)))
        g.nodes.append(Node("Relu", [v], [out], {}, name=f"relu{i}"))
        v = out
    g.outputs.append(v)
    c = clone_graph(g)
    assert len(c.nodes) == 5000 and c.outputs[0].name == "v4999" and c.outputs[0] is not g.outputs[0]
    assert c.nodes[-1].inputs[0] is c.nodes[-2].outputs[0] and c.nodes[0].inputs[0] is c.inputs[0]
    assert all(a is not b for a, b in zip(c.nodes, g.nodes))
