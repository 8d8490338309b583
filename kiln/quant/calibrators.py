"""Activation calibrators: batches of a tensor in, one symmetric INT8 range (amax >= 0) per tensor name out.

    cal = make_calibrator("entropy")
    for batch in data:
        for name, x in activations(batch).items():
            cal.observe(name, x)          # any float dtype, any device
    ranges = cal.amax()                   # {name: amax}; the int8 scale of a tensor is amax / 127

Calibrators (TensorRT's set):

- ``minmax``: max |x| over every batch.
- ``entropy``: TensorRT's KL-divergence threshold search on a histogram of |x| (`entropy_threshold`).
- ``percentile``: the |x| value below which p % of the values lie (`percentile_threshold`, p = 99.99 by default).
- ``mse``: the range minimizing the expected squared error of int8 quantization (`mse_threshold`).

The three histogram calibrators share one collector per tensor (`Histogram`): 2048 bins over [0, range],
right-closed — bin 0 is [0, w], bin j is (j*w, (j+1)*w], w = range / 2048 — so the largest value lies in
the last bin. The range is the first batch's max |x| (batches of zeros before it are counted in bin 0).
When a later batch's max |x| exceeds the range, the range doubles, repeatedly, until it holds the batch;
each doubling adds bins (2j, 2j+1) into bin j (upper half emptied). Because the bins are right-closed and
the range only ever doubles, a value's bin after merging is exactly the bin it would have had in a
histogram built at the final range (ceil(y) - 1 halved = ceil(y / 2) - 1), so streaming and one-shot
histograms agree exactly: the bin of |x| is ``clamp(ceil(|x| * (2048 / range)) - 1, 0, 2047)``, computed in
the batch's precision (float32, or float64 for float64 input) with 2048 / range rounded once to it.

Counting is one vectorized pass on the tensor's own device (torch.bincount; integer counts, so
deterministic on CUDA too), then the counts move to the host as float64 (exact below 2**53). Every
threshold search is deterministic numpy float64; ties take the smallest threshold. A NaN or Inf in an
observed tensor raises CalibrationError naming the tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from kiln.errors import CalibrationError

__all__ = ["CALIBRATORS", "Calibrator", "EntropyCalibrator", "Histogram", "MinMaxCalibrator", "MSECalibrator",
           "PercentileCalibrator", "entropy_threshold", "kl_divergences", "make_calibrator", "mse_errors",
           "mse_threshold", "percentile_threshold"]

CALIBRATORS: tuple[str, ...] = ("minmax", "entropy", "percentile", "mse")
BINS = 2048          # histogram bins of |x|
START_BIN = 128      # first candidate threshold (in bins) of the entropy and MSE searches
LEVELS = 128         # quantized levels of |x| in int8 (0..127), the entropy search's Q resolution
QMAX = 127           # largest int8 magnitude: scale = amax / QMAX
KL_EPSILON = 1e-12   # stands in for a zero Q where P > 0 (TensorRT's search would otherwise see an infinite KL)
_CHUNK = 128         # MSE candidates evaluated per vectorized block (bounds temporaries to ~2 MiB each)


def _magnitudes(name: str, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """|x| (float32, or float64 for float64 input) and its max; None for an empty tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise CalibrationError(f"calibration tensor {name!r} is not a floating-point tensor ({kind})")
    if x.numel() == 0:
        return None
    a = x.detach().abs()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()  # exact: float16/bfloat16 values are float32 values
    m = float(a.max())  # max propagates NaN
    if not math.isfinite(m):
        raise CalibrationError(f"calibration tensor {name!r} holds NaN or Inf values")
    return a, m


class Calibrator:
    """Base of the calibrators: `observe` every batch of every tensor, then read `amax`.

    A tensor observed only as empty or all-zero batches gets amax 0. `amax` lists names in the order
    they were first observed and may be called again after more batches.
    """

    name: str = ""

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Record one batch of tensor `name` (any float dtype, any device; not modified)."""
        got = _magnitudes(name, x)
        self._observe(name, got)

    def amax(self) -> dict[str, float]:
        """The symmetric range (amax >= 0) of every observed tensor."""
        raise NotImplementedError

    def _observe(self, name: str, got: tuple[torch.Tensor, float] | None) -> None:
        raise NotImplementedError


class MinMaxCalibrator(Calibrator):
    """amax = max |x| over all batches."""

    name = "minmax"

    def __init__(self) -> None:
        self._max: dict[str, float] = {}

    def _observe(self, name: str, got: tuple[torch.Tensor, float] | None) -> None:
        m = 0.0 if got is None else got[1]
        self._max[name] = max(self._max.get(name, 0.0), m)

    def amax(self) -> dict[str, float]:
        return dict(self._max)


class Histogram:
    """Counts of |x| of one tensor in `bins` right-closed bins over [0, range] (rules: module docstring)."""

    def __init__(self, bins: int = BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError("the bin count must be even and >= 2")
        self.bins = bins
        self.range = 0.0  # 0 until a batch with a nonzero value arrives
        self.counts = np.zeros(bins, dtype=np.float64)
        self._zeros = 0.0  # values seen while the range was still 0

    @property
    def width(self) -> float:
        """Width of one bin (0 before the range is set)."""
        return self.range / self.bins

    @property
    def total(self) -> float:
        """Number of values counted."""
        return float(self.counts.sum()) + self._zeros

    def add(self, a: torch.Tensor, amax: float) -> None:
        """Count the magnitudes `a` (>= 0, finite) whose max is `amax`."""
        if amax == 0.0:
            if self.range == 0.0:
                self._zeros += a.numel()
            else:
                self.counts[0] += a.numel()
            return
        if self.range == 0.0:
            self.range = amax
            self.counts[0] += self._zeros
            self._zeros = 0.0
        while amax > self.range:
            self._grow()
        self.counts += self._bincount(a)

    def _grow(self) -> None:
        """Double the range: bins (2j, 2j+1) become bin j."""
        half = self.counts.reshape(self.bins // 2, 2).sum(axis=1)
        self.counts = np.zeros(self.bins, dtype=np.float64)
        self.counts[: self.bins // 2] = half
        self.range *= 2.0

    def _bincount(self, a: torch.Tensor) -> np.ndarray:
        dt = np.float64 if a.dtype == torch.float64 else np.float32
        with np.errstate(over="ignore", divide="ignore"):
            scale = dt(self.bins) / dt(self.range)
        if not (np.isfinite(scale) and scale > 0):  # a range beyond float32's reach
            a, scale = a.double(), np.float64(self.bins) / np.float64(self.range)
        idx = torch.ceil(a.reshape(-1) * float(scale)).sub_(1).clamp_(0, self.bins - 1).long()
        return torch.bincount(idx, minlength=self.bins).cpu().numpy().astype(np.float64)


class _HistogramCalibrator(Calibrator):
    """A calibrator whose range is a threshold search over each tensor's `Histogram`."""

    def __init__(self) -> None:
        self.histograms: dict[str, Histogram] = {}
        self.peaks: dict[str, float] = {}

    def _observe(self, name: str, got: tuple[torch.Tensor, float] | None) -> None:
        h = self.histograms.setdefault(name, Histogram())
        if got is not None:
            self.peaks[name] = max(self.peaks.get(name, 0.0), got[1])
            h.add(*got)

    def amax(self) -> dict[str, float]:
        """Each tensor's threshold, never above its largest |x| (a grown histogram's range reaches up to twice
        that, and a search over its bins may land past it)."""
        return {n: (min(self._threshold(h.counts, h.width), self.peaks[n]) if h.range > 0 else 0.0)
                for n, h in self.histograms.items()}

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        raise NotImplementedError


class EntropyCalibrator(_HistogramCalibrator):
    """TensorRT's entropy calibration: the threshold minimizing KL(P || Q) (`entropy_threshold`)."""

    name = "entropy"

    def _observe(self, name: str, got: tuple[torch.Tensor, float] | None) -> None:
        """Exact zeros are not counted (pytorch-quantization's skip_zeros): after a ReLU, or in a padded image,
        they are most of the mass, and a KL search dominated by one spike at 0 picks a range that clips most
        of the real values (a digits image: 0.06 instead of 1.0)."""
        if got is not None:
            a, m = got
            got = (a[a > 0], m)
        super()._observe(name, got)

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        return entropy_threshold(counts, width)


class PercentileCalibrator(_HistogramCalibrator):
    """amax = the `percentile`-th percentile of |x| (`percentile_threshold`)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not (0.0 < float(percentile) <= 100.0):
            raise CalibrationError(f"percentile must be a number in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        return percentile_threshold(counts, width, self.percentile)


class MSECalibrator(_HistogramCalibrator):
    """amax = the bin edge minimizing the expected squared int8 quantization error (`mse_threshold`)."""

    name = "mse"

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        return mse_threshold(counts, width)


def make_calibrator(name: str, percentile: float = 99.99) -> Calibrator:
    """A new calibrator by name (one of CALIBRATORS); `percentile` is used by "percentile" only."""
    if name == "minmax":
        return MinMaxCalibrator()
    if name == "entropy":
        return EntropyCalibrator()
    if name == "percentile":
        return PercentileCalibrator(percentile)
    if name == "mse":
        return MSECalibrator()
    raise CalibrationError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")


def _chunks(candidates: np.ndarray) -> list[np.ndarray]:
    return [candidates[k:k + _CHUNK] for k in range(0, len(candidates), _CHUNK)]


def _xlogx(v: np.ndarray) -> np.ndarray:
    """v * log(v), 0 where v == 0."""
    return v * np.log(np.where(v > 0, v, 1.0))


def entropy_threshold(counts: np.ndarray, width: float, start: int = START_BIN, levels: int = LEVELS) -> float:
    """TensorRT's KL-divergence threshold over a histogram of |x| (bins of `width`); 0 for an empty histogram.

    The candidate i in [start, n] bins with the smallest `kl_divergences` (the first minimum) gives
    (i + 0.5) * width, as TensorRT documents.
    """
    h = np.asarray(counts, dtype=np.float64)
    if float(h.sum()) == 0 or h.size < start:
        return 0.0
    return (start + int(np.argmin(kl_divergences(h, start, levels))) + 0.5) * width


def kl_divergences(counts: np.ndarray, start: int = START_BIN, levels: int = LEVELS) -> np.ndarray:
    """KL(P || Q) of TensorRT's entropy calibration for every candidate i in [start, n] bins (n >= start).

    For each candidate i:
      P = counts[:i] with the outlier mass counts[i:] added to P[i-1], normalized;
      Q = counts[:i] quantized into `levels` groups (bin j in group floor(j * levels / i)), each group's
          count spread uniformly over its non-empty bins (empty bins stay 0), normalized;
      KL(P || Q) = sum over P > 0 of P log(P / Q), with KL_EPSILON for Q = 0.

    Evaluated per group rather than per bin (levels, not n, values per candidate): with N the total count,
    K = counts[:i].sum() and avg_g the group's mean over its non-empty bins, a bin j < i-1 with h_j > 0 has
    P = h_j / N and Q = avg_g / K > 0, so those bins sum to (sum h_j log h_j - H (log N - log K)
    - sum over groups of gsum_g log avg_g, less bin i-1's share) / N, H their mass; bin i-1 is added
    on its own (its P carries the outliers, its Q may be 0).
    """
    h = np.asarray(counts, dtype=np.float64)
    n, total = h.size, float(h.sum())
    if total == 0:
        raise ValueError("kl_divergences of an empty histogram")
    cum = np.concatenate(([0.0], np.cumsum(h)))
    cum_nonempty = np.concatenate(([0.0], np.cumsum(h > 0)))
    cum_hlogh = np.concatenate(([0.0], np.cumsum(_xlogx(h))))
    i = np.arange(start, n + 1)
    starts = -(-np.arange(levels + 1) * i[:, None] // levels)  # group g covers bins [starts[g], starts[g+1])
    gsum, gcnt = np.diff(cum[starts], axis=1), np.diff(cum_nonempty[starts], axis=1)
    avg = np.divide(gsum, gcnt, out=np.zeros_like(gsum), where=gcnt > 0)
    log_avg = np.log(np.where(gsum > 0, avg, 1.0))
    last, last_avg, last_log_avg = h[i - 1], avg[:, -1], log_avg[:, -1]  # bin i-1 is in the last group
    kept, head = cum[i], cum[i - 1]
    log_kept = np.log(np.where(kept > 0, kept, 1.0))
    inner = np.sum(gsum * log_avg, axis=1) - last * last_log_avg
    body = (cum_hlogh[i - 1] - head * (np.log(total) - log_kept) - inner) / total
    p_last = (last + total - kept) / total
    q_last = np.where(last > 0, last_avg / np.where(kept > 0, kept, 1.0), KL_EPSILON)
    edge = _xlogx(p_last) - p_last * np.log(q_last)
    return body + edge


def percentile_threshold(counts: np.ndarray, width: float, percentile: float) -> float:
    """The smallest t with `percentile` % of the histogram's mass at or below t, linear inside a bin."""
    h = np.asarray(counts, dtype=np.float64)
    total = float(h.sum())
    if total == 0:
        return 0.0
    target = percentile / 100.0 * total
    cum = np.cumsum(h)
    b = min(int(np.searchsorted(cum, target, side="left")), h.size - 1)
    below = cum[b] - h[b]
    frac = (target - below) / h[b] if h[b] > 0 else 1.0
    return (b + min(max(frac, 0.0), 1.0)) * width


def _suffix_sums(v: np.ndarray) -> np.ndarray:
    """out[k] = v[k:].sum() for k in [0, len(v)]."""
    return np.concatenate((np.cumsum(v[::-1])[::-1], [0.0]))


def mse_threshold(counts: np.ndarray, width: float, start: int = START_BIN, qmax: int = QMAX) -> float:
    """The bin edge k * width (k in [start, n]) with the smallest `mse_errors` (the first minimum)."""
    h = np.asarray(counts, dtype=np.float64)
    if float(h.sum()) == 0 or h.size < start:
        return 0.0
    return (start + int(np.argmin(mse_errors(h, start, qmax)))) * width


def mse_errors(counts: np.ndarray, start: int = START_BIN, qmax: int = QMAX) -> np.ndarray:
    """Expected squared int8 quantization error, in squared bin widths, for amax = k bins, k in [start, n].

    With scale s = k / qmax, a value x <= k costs its rounding error (x - s * round(x / s))**2 and a value
    above costs its clipping error (x - k)**2. Each bin's count is taken as spread uniformly over the bin
    and its error integrated exactly (a bin-centre estimate aliases against the quantization grid and
    moves the minimum by tens of bins). Rounding goes through F(u) = integral over [0, u] of the squared
    rounding error = m * s**3 / 12 + r**3 / 3 (u = m * s + r, |r| <= s / 2); clipping through suffix
    moments of the counts: a bin j >= k costs (j - k)**2 + (j - k) + 1/3 per value.
    """
    h = np.asarray(counts, dtype=np.float64)
    n, total = h.size, float(h.sum())
    if total == 0:
        raise ValueError("mse_errors of an empty histogram")
    j = np.arange(n, dtype=np.float64)
    s0, s1, s2 = _suffix_sums(h), _suffix_sums(h * j), _suffix_sums(h * j * j)
    k = np.arange(start, n + 1)
    kf = k.astype(np.float64)
    clipping = s2[k] + (1.0 - 2.0 * kf) * s1[k] + (kf * kf - kf + 1.0 / 3.0) * s0[k]
    rounding = []
    edges = np.arange(n + 1, dtype=np.float64)
    for kc in _chunks(k):
        top = int(kc[-1])                                   # bins >= top are outside every candidate here
        step = (kc / qmax)[:, None]
        m = np.rint(edges[: top + 1] / step)
        r = edges[: top + 1] - m * step
        per_bin = np.diff(m * (step ** 3 / 12.0) + r * r * r / 3.0, axis=1)   # C x top: mean error of a bin
        per_bin *= j[:top] < kc[:, None]
        rounding.append(per_bin @ h[:top])
    return (np.concatenate(rounding) + clipping) / total
