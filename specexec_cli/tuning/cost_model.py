"""The SpecExec cost model: predicted tokens/s of a configuration before any weights are loaded.

    S(K) = G(K) / (T_draft(K) + T_target(K + 1) + T_host)

- T_target(B): target forward time for B new tokens. Measured at a few batch sizes where possible (a
  `LatencyCurve`); otherwise the roofline n_layers * max(layer_bytes / bandwidth, layer_flops(B) / F).
  Flat up to a knee, then linear in B.
- T_draft(K): (draft passes per iteration) * t_draft(batch <= max_n_beams).
- G(K): expected tokens per iteration, the pair's acceptance curve (`AcceptanceCurve`), measured from
  one large-budget run on calibration prompts, or a prior when nothing is measured.
- T_host: per-iteration host overhead.

Plain decoding is the K = 0 point: S = 1 / (T_target(1) + T_host).

A target whose layers stream (from RAM or disk, `--max-memory`) reads its streamed layers once per pass
while computing, so T_target(B) = max(streamed bytes / read bandwidth, compute(B)) (`streamed_forward_s`):
flat at the read time up to the compute knee, whatever the token count. A few measured passes give the
compute curve and the read time, and the formula predicts every budget.

Everything here is a pure function of plain numbers, so it is cheap enough to rule out infeasible
(memory) and hopeless (predicted far below the best measured) trials and to seed the search.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from specexec_cli.tuning.shape import (  # noqa: F401  (re-exported: the cost model's vocabulary)
    BYTES_PER_PARAM,
    DEQUANT_BYTES_PER_PARAM,
    ModelShape,
    bytes_per_param,
    embedding_bytes_per_param,
)

DEFAULT_HOST_OVERHEAD_S = 0.005


def layer_time_s(
    shape: ModelShape,
    quantization: str,
    batch: int,
    bandwidth: float,
    flops: float,
    device_bandwidth: float | None = None,
) -> float:
    """One decoder layer: max(bytes / bandwidth, flops / F) (a batch of MoE tokens reads every expert,
    each token multiplies with its own), plus, for 4-bit / int8 weights, writing and reading the
    dequantized 16-bit copy at `device_bandwidth` (default: `bandwidth`)."""
    move = max(shape.layer_bytes(quantization) / bandwidth, 2.0 * shape.layer_active_params * batch / flops)
    decode = DEQUANT_BYTES_PER_PARAM.get(quantization, 0.0) * shape.layer_params
    return move + decode / (device_bandwidth or bandwidth)


def head_time_s(shape: ModelShape, quantization: str, batch: int, bandwidth: float, flops: float) -> float:
    head_bytes = shape.head_params * embedding_bytes_per_param(quantization)
    return max(head_bytes / bandwidth, 2.0 * shape.head_params * batch / flops)


def roofline_forward_s(
    shape: ModelShape, quantization: str, batch: int, bandwidth: float, flops: float
) -> float:
    """Roofline forward time of a resident model for `batch` new tokens (weights read at `bandwidth`)."""
    return shape.n_layers * layer_time_s(shape, quantization, batch, bandwidth, flops) + head_time_s(
        shape, quantization, batch, bandwidth, flops
    )


def offloaded_forward_s(
    shape: ModelShape,
    quantization: str,
    batch: int,
    h2d_bandwidth: float,
    device_bandwidth: float,
    flops: float,
    resident_layers: int = 0,
) -> float:
    """Roofline forward time of an offloaded target: streamed layers at the pinned host-to-device
    bandwidth, resident layers and the LM head at device memory bandwidth."""
    streamed = shape.n_layers - resident_layers
    return (
        streamed * layer_time_s(shape, quantization, batch, h2d_bandwidth, flops, device_bandwidth)
        + resident_layers * layer_time_s(shape, quantization, batch, device_bandwidth, flops)
        + head_time_s(shape, quantization, batch, device_bandwidth, flops)
    )


@dataclass(frozen=True)
class LatencyCurve:
    """Forward time (s) at a few batch sizes: piecewise linear between them, linear beyond the last."""

    batches: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.batches or len(self.batches) != len(self.seconds):
            raise ValueError("a latency curve needs as many times as batch sizes, at least one")
        if list(self.batches) != sorted(set(self.batches)):
            raise ValueError("latency curve batch sizes must be strictly increasing")

    @classmethod
    def from_points(cls, points: dict[int, float] | Sequence[tuple[int, float]]) -> LatencyCurve:
        items = sorted(dict(points).items())
        return cls(tuple(int(b) for b, _ in items), tuple(float(s) for _, s in items))

    @classmethod
    def roofline(
        cls,
        shape: ModelShape,
        quantization: str,
        bandwidth: float,
        flops: float,
        batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    ) -> LatencyCurve:
        return cls.from_points(
            [(b, roofline_forward_s(shape, quantization, b, bandwidth, flops)) for b in batches]
        )

    def at(self, batch: float) -> float:
        xs, ys = self.batches, self.seconds
        if len(xs) == 1 or batch <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, batch)
        if i < len(xs) and xs[i] == batch:
            return ys[i]
        lo, hi = (i - 1, i) if i < len(xs) else (len(xs) - 2, len(xs) - 1)
        slope = max(0.0, (ys[hi] - ys[lo]) / (xs[hi] - xs[lo]))
        return ys[lo] + slope * (batch - xs[lo])

    def knee(self, tolerance: float = 1.25) -> int:
        """The largest measured batch whose time is within `tolerance` x the single-token time."""
        base = self.at(1)
        inside = [b for b, s in zip(self.batches, self.seconds, strict=True) if s <= tolerance * base]
        return max(inside) if inside else self.batches[0]

    def to_dict(self) -> dict:
        return {"batches": list(self.batches), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyCurve:
        return cls(tuple(int(b) for b in data["batches"]), tuple(float(s) for s in data["seconds"]))


def streamed_forward_s(
    tokens: float,
    compute: LatencyCurve,
    layer_bytes: float,
    n_layers: int,
    resident_layers: int,
    read_bandwidth: float,
) -> float:
    """Forward time of a target whose last n_layers - resident_layers layers stream each pass:
    max(streamed bytes / read bandwidth, compute(tokens)). `compute` is the forward time with every
    layer in memory (the resident-equivalent pass); reads of the next layers overlap the compute of the
    current ones, so the slower of the two sets the pace."""
    streamed_bytes = max(0, n_layers - resident_layers) * layer_bytes
    read_s = streamed_bytes / read_bandwidth if read_bandwidth > 0 else 0.0
    return max(read_s, compute.at(tokens))


def streamed_curve(
    compute: LatencyCurve,
    layer_bytes: float,
    n_layers: int,
    resident_layers: int,
    read_bandwidth: float,
    batches: Sequence[int],
) -> LatencyCurve:
    """`streamed_forward_s` at `batches`, as a curve the rest of the model reads like a measured one."""
    args = (compute, layer_bytes, n_layers, resident_layers, read_bandwidth)
    return LatencyCurve.from_points([(b, streamed_forward_s(b, *args)) for b in batches])


@dataclass(frozen=True)
class AcceptanceCurve:
    """G(K) for K = 0..len-1 (values[0] = G(0) = 1: plain decoding emits one token per pass).

    Beyond the measured range the curve is held flat, which never overstates a larger tree.
    `depths[K]`, when known, is the mean depth of the top-K tree: a lower bound on draft passes.
    """

    values: tuple[float, ...]
    depths: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.values or abs(self.values[0] - 1.0) > 1e-6:
            raise ValueError("an acceptance curve starts at G(0) = 1")

    @property
    def max_budget(self) -> int:
        return len(self.values) - 1

    def at(self, budget: int) -> float:
        return self.values[min(max(budget, 0), len(self.values) - 1)]

    def depth_at(self, budget: int) -> float | None:
        if self.depths is None:
            return None
        return self.depths[min(max(budget, 0), len(self.depths) - 1)]

    def budget_within_depth(self, budget: int, max_depth: int) -> int:
        """The largest K <= budget whose top-K tree is at most `max_depth` deep on average: what a tree
        capped at `max_depth` levels is worth (its nodes past the cap, the deep ones that G(K) counts,
        cannot be grown). `budget` itself when depths are unknown."""
        if self.depths is None:
            return budget
        deepest = self._running_depths
        return max(0, min(budget, bisect.bisect_right(deepest, float(max_depth)) - 1))

    @functools.cached_property
    def _running_depths(self) -> tuple[float, ...]:
        """depths[0..K] made non-decreasing (a running maximum), so a search can bisect it."""
        return tuple(itertools.accumulate(self.depths or (), max))

    @classmethod
    def from_iterations(
        cls, curves: Sequence[Sequence[float]], depth_curves: Sequence[Sequence[float]] | None = None
    ) -> AcceptanceCurve:
        """Mean over iterations of per-iteration curves c, where c[k - 1] = G(k) for k = 1..len(c).

        A tree can stop short of its budget; its curve is held at its last value past its end.
        """
        if not curves:
            raise ValueError("no acceptance curves to average")
        values = [1.0] + _mean_padded([[float(v) for v in c] for c in curves])
        depths = None
        if depth_curves:
            depths = tuple([0.0] + _mean_padded([[float(v) for v in c] for c in depth_curves]))
        return cls(tuple(values), depths)

    @classmethod
    def prior(cls, scale: float = 2.1, k0: float = 3.5, max_budget: int = 4096) -> AcceptanceCurve:
        """G(K) = 1 + scale * log2(1 + K / k0): a smooth prior, not a measurement.

        The defaults pass through the paper's Llama-2 7B/70B figures (G(128) ~ 12, G(2048) ~ 20.6);
        a weaker pair has a smaller scale (top-1 agreement p gives roughly G(1) = 1 + p). The assumed
        tree depth is min(K, 2 (G(K) - 1)): twice the expected accepted length, at least one.
        """
        values = tuple(1.0 + scale * math.log2(1.0 + k / k0) for k in range(max_budget + 1))
        depths = tuple(float(min(k, max(1.0, 2.0 * (g - 1.0)))) for k, g in enumerate(values))
        return cls(values, depths)

    def to_dict(self) -> dict:
        data: dict = {"values": [round(v, 5) for v in self.values]}
        if self.depths is not None:
            data["depths"] = [round(v, 4) for v in self.depths]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AcceptanceCurve:
        depths = data.get("depths")
        return cls(
            tuple(float(v) for v in data["values"]), tuple(float(v) for v in depths) if depths else None
        )


def _mean_padded(rows: list[list[float]]) -> list[float]:
    rows = [r for r in rows if r]
    if not rows:
        return []
    length = max(len(r) for r in rows)
    padded = [r + [r[-1]] * (length - len(r)) for r in rows]
    return [sum(col) / len(padded) for col in zip(*padded, strict=True)]


def depth_cap(budget: int, max_beam_len: int | None) -> int:
    """The deepest a tree of `budget` nodes gets with at most `max_beam_len` draft passes (None: no cap)."""
    return budget if max_beam_len is None else min(budget, max_beam_len)


def draft_passes(budget: int, max_n_beams: int, max_beam_len: int | None,
                 depth: float | None = None) -> float:
    """Draft passes per iteration for a tree of `budget` nodes.

    Reaching depth d takes d passes, and a tree of K nodes needs about K / 2 expansions at most
    max_n_beams per pass, so passes are at least max(depth, K / (2 max_n_beams)); at most
    max_beam_len (None: no cap). Without a known depth the tree is assumed as deep as allowed: an
    upper bound on draft cost.
    """
    if budget <= 0:
        return 0.0
    cap = float(depth_cap(budget, max_beam_len))
    deep = cap if depth is None else depth
    return min(cap, max(1.0, deep, math.ceil(budget / (2 * max_n_beams))))


@dataclass(frozen=True)
class PairCosts:
    """Everything the model needs about one (target variant, draft) pair on one machine."""

    target: LatencyCurve
    draft: LatencyCurve | None = None
    acceptance: AcceptanceCurve | None = None
    host_s: float = DEFAULT_HOST_OVERHEAD_S


def draft_time_s(costs: PairCosts, budget: int, max_n_beams: int, max_beam_len: int | None) -> float:
    if costs.draft is None or budget <= 0:
        return 0.0
    depth = costs.acceptance.depth_at(budget) if costs.acceptance else None
    passes = draft_passes(budget, max_n_beams, max_beam_len, depth)
    return passes * costs.draft.at(min(max_n_beams, budget))


def predict_tokens_per_s(
    costs: PairCosts, budget: int, max_n_beams: int = 32, max_beam_len: int | None = None
) -> float:
    """S(K) = G(K) / (T_draft(K) + T_target(K + 1) + T_host); budget 0 is plain decoding.

    The tree the draft can grow is limited by its shape: at most max_beam_len deep (None: no cap but
    the budget), so no iteration emits more than max_beam_len + 1 tokens, and a capped tree is worth
    what the uncapped tree of the largest budget no deeper than the cap is worth
    (`AcceptanceCurve.budget_within_depth`); and at most max_n_beams * max_beam_len expansions, which
    hold the best ~2x that many nodes (a best-first tree has about one internal node per two), so G is
    read at min(K, effective_budget(...), budget_within_depth(...)).
    """
    if budget <= 0 or costs.draft is None:
        return 1.0 / (costs.target.at(1) + costs.host_s)
    acceptance = costs.acceptance or AcceptanceCurve.prior()
    seconds = (
        draft_time_s(costs, budget, max_n_beams, max_beam_len) + costs.target.at(budget + 1) + costs.host_s
    )
    depth = depth_cap(budget, max_beam_len)
    usable = min(budget, effective_budget(max_n_beams, depth), acceptance.budget_within_depth(budget, depth))
    return min(acceptance.at(usable), depth + 1.0) / seconds


def effective_budget(max_n_beams: int, max_beam_len: int) -> int:
    """The most tree nodes a draft of this shape can make that are as good as the best-first top-K."""
    return 2 * max_n_beams * max_beam_len


def best_budget(
    costs: PairCosts, budgets: Sequence[int], max_n_beams: int = 32, max_beam_len: int | None = None
) -> tuple[int, float]:
    """(budget, predicted tokens/s) that maximizes S over `budgets` (Sequoia's pick)."""
    scored = [(predict_tokens_per_s(costs, b, max_n_beams, max_beam_len), -b) for b in budgets]
    speed, neg_budget = max(scored)
    return -neg_budget, speed


def is_hopeless(predicted: float, best_measured: float | None, ratio: float = 0.5) -> bool:
    """A trial is hopeless when even its prediction is below `ratio` x the best measured so far."""
    return best_measured is not None and predicted < ratio * best_measured
