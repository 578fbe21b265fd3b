"""How deep and how wide a SpecExec tree grows: one more draft pass runs only while it is expected to
raise the iteration's tokens per second, judged from this run's own pass times.

An iteration that has run its draft passes so far and then runs one target pass takes T seconds and
emits, in expectation, G = R + alpha * M tokens: R lanes each get the target's bonus token, M is the sum
over the kept tree nodes of their draft path probabilities (the draft's estimate of what each node adds,
brief step 1), and alpha is the run's measured ratio of accepted tokens to M. The next pass over the B
best expandable nodes, with path probabilities p_1 >= ... >= p_B, adds about c * alpha * (p_1 + ... +
p_B), where c is the share of its expanded mass that the last pass really added to the kept tree
(trimming included), and costs t_draft(B). It runs, over the B that maximizes the new rate, when

    (G + gain(B)) / (T + t_draft(B)) > G / T.

t_draft(B) and t_target are straight-line fits (seconds = fixed + per_token * tokens) of the run's
latest timed passes (decoding/stats.py). On a GPU a draft pass costs milliseconds against seconds for a
streamed target pass, so the tree grows until no unexpanded node can enter the budget; on a CPU, where
a draft pass costs a good share of a target pass and every extra row costs time, each pass and each
beam must earn its cost. `TreeConfig.max_beam_len` still caps the passes; `TreeConfig.draft_cost` fixes
the cost of one draft pass as a fraction of the target pass (0: depth is free), which makes the tree a
function of the committed tokens alone (tests, benchmarks that compare tree shapes, the tuner).

Only the tree's shape depends on these estimates, never the output: every emitted token is the target's
(decoding/specexec.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from specexec_cli.decoding.config import TreeConfig
from specexec_cli.decoding.stats import PassStats

FIRST_ITERATION_PASSES = 8  # draft passes per iteration until a target pass has been timed
WINDOW = 64  # latest passes of each model that the time fits use
CALIBRATION_PRIOR = 2.0  # pseudo-tokens on both sides of alpha, so the first iterations start near 1
ALPHA_RANGE = (0.05, 4.0)


@dataclass(frozen=True)
class PassTime:
    """seconds = fixed + per_token * tokens, both >= 0."""

    fixed: float
    per_token: float

    def at(self, tokens: float) -> float:
        return self.fixed + self.per_token * tokens


def fit_pass_time(points: list[tuple[int, float]]) -> PassTime | None:
    """Least-squares line through (tokens, seconds) points, kept non-negative; None without points."""
    if not points:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var > 0 else 0.0
    if slope <= 0:
        return PassTime(mean_y, 0.0)
    fixed = mean_y - slope * mean_x
    if fixed < 0:  # a line through the origin instead
        return PassTime(0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points))
    return PassTime(fixed, slope)


def best_beams(gains: list[float], expected: float, seconds: float, draft_time: PassTime) -> int:
    """How many of the candidates to expand in the next pass (0: stop growing).

    gains[i]: expected tokens the (i+1)-th best candidate adds; expected, seconds: the iteration's G and
    T so far. Picks the count that maximizes (G + gain) / (T + t_draft), if that beats G / T.
    """
    best_rate, best_count, total = expected / seconds, 0, 0.0
    for count, gain in enumerate(gains, start=1):
        total += gain
        rate = (expected + total) / (seconds + draft_time.at(count))
        if rate > best_rate * (1.0 + 1e-9):
            best_rate, best_count = rate, count
    return best_count


class GrowthRule:
    """Lives as long as its decoder: learns pass times and the draft's calibration across iterations, and
    answers, between draft passes, how many nodes the next pass should expand."""

    def __init__(self, tree: TreeConfig) -> None:
        self.tree = tree
        self.draft_points: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.target_points: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.accepted = 0.0  # tokens accepted from trees (bonus tokens not counted)
        self.predicted = 0.0  # the draft's estimate of them: the kept trees' mass M
        self._read = 0  # stats.passes_timed already taken into the fits

    @property
    def alpha(self) -> float:
        """Accepted tokens per unit of draft path probability, measured so far."""
        ratio = (self.accepted + CALIBRATION_PRIOR) / (self.predicted + CALIBRATION_PRIOR)
        return min(max(ratio, ALPHA_RANGE[0]), ALPHA_RANGE[1])

    def read_times(self, stats: PassStats) -> None:
        """Take the passes timed since the last call into the fits."""
        recent = stats.recent()
        new = min(stats.passes_timed - self._read, len(recent))
        for which, tokens, seconds in recent[len(recent) - new:] if new > 0 else []:
            (self.draft_points if which == "draft" else self.target_points).append((tokens, seconds))
        self._read = stats.passes_timed

    def costs(self, tree_tokens: int) -> tuple[PassTime, float] | None:
        """(draft pass time, target pass time for `tree_tokens` rows) in seconds, or in target passes when
        the draft cost is fixed; None until both models have been timed."""
        if self.tree.draft_cost is not None:
            return PassTime(self.tree.draft_cost, 0.0), 1.0
        draft, target = fit_pass_time(list(self.draft_points)), fit_pass_time(list(self.target_points))
        if draft is None or target is None:
            return None
        return draft, max(target.at(tree_tokens), 1e-9)

    def begin(self, stats: PassStats, n_roots: int, catch_up_tokens: int,
              depth_limit: int | None = None) -> Growth:
        """The state of one iteration's growth, right after the draft's catch-up pass; `depth_limit`: the
        most passes worth running (a tree of p passes is at most p deep)."""
        self.read_times(stats)
        costs = self.costs(self.tree.budget + n_roots)
        cap = self.tree.max_beam_len
        if depth_limit is not None:
            cap = depth_limit if cap is None else min(cap, depth_limit)
        return Growth(self, n_roots, costs, catch_up_tokens, cap)

    def observe(self, accepted: int, mass: float) -> None:
        """After validation: `accepted` tree tokens against the kept tree's mass `mass`."""
        self.accepted += accepted
        self.predicted += mass


class Growth:
    """One iteration: tracks G and T as passes run and picks the next pass's width."""

    def __init__(self, rule: GrowthRule, n_roots: int, costs: tuple[PassTime, float] | None,
                 catch_up_tokens: int, max_passes: int | None = None) -> None:
        self.rule, self.n_roots, self.costs, self.max_passes = rule, n_roots, costs, max_passes
        self.passes = 1  # the catch-up pass, which expanded the roots
        self.expanded_mass = float(n_roots)  # path probability of the nodes the last pass expanded
        self.mass = 0.0  # the kept tree's mass M before the last pass
        self.seconds = 0.0
        if costs is not None:
            draft, target = costs
            self.seconds = target + draft.at(catch_up_tokens)

    def next_pass(self, mass: float, scores: list[float]) -> int:
        """After a pass that left the kept tree with mass `mass`: how many of the candidates (their log
        path probabilities `scores`, best first) the next pass expands; 0 stops the growth."""
        share = min(max((mass - self.mass) / self.expanded_mass, 0.0), 1.0) if self.expanded_mass > 0 else 0.0
        self.mass = mass
        cap = self.max_passes
        if not scores or (cap is not None and self.passes >= cap):
            return 0
        if self.costs is None:  # nothing timed yet: the first iteration grows a fixed number of passes
            count = len(scores) if self.passes < FIRST_ITERATION_PASSES else 0
        else:
            alpha = self.rule.alpha
            gains = [alpha * share * math.exp(s) for s in scores]
            count = best_beams(gains, self.n_roots + alpha * mass, self.seconds, self.costs[0])
        if count:
            self.passes += 1
            self.expanded_mass = sum(math.exp(s) for s in scores[:count])
            if self.costs is not None:
                self.seconds += self.costs[0].at(count)
        return count
