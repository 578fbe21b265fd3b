"""Chunked prefill: a prompt that joins a batch already decoding enters in pieces, one piece per
iteration, riding in the same target pass as the others' trees, so the requests already decoding keep
their pace (the idea of Sarathi-Serve, arXiv 2403.02310, and vLLM's chunked prefill).

A piece adds rows to a pass, never a pass of its own: with the target's layers streamed, a pass costs
the reading of every layer whatever it computes, so a separate prefill pass would cost a whole read.
How many prompt tokens a pass takes is chosen from this run's own measured pass times (the straight-line
fits of decoding/growth.py, seconds = fixed + per_token * tokens): the rows may add at most
`PREFILL_SHARE` times the time of the pass without them. On a GPU streaming its target the fixed read time
dominates and a whole prompt fits in one pass; on a CPU, where every row costs compute, the prompt is
spread over a few passes. A lone prompt (nothing decoding yet) always enters whole.

Only where a prompt's keys are computed changes, never their values' positions or what attends to what,
so the output is the same as with the prompt entered whole.
"""

from __future__ import annotations

from specexec_cli.decoding.growth import WINDOW, PassTime, fit_pass_time
from specexec_cli.decoding.lanes import Lane, Piece
from specexec_cli.decoding.stats import PassStats

PREFILL_SHARE = 1.0  # each entering prompt may add this times the time of the pass without pieces
UNTIMED_CHUNK = 512  # prompt tokens per pass before any pass has been timed
MIN_CHUNK = 16  # never fewer prompt tokens per pass than this (so a long prompt always makes progress)


def pending(lane: Lane) -> int:
    """Committed tokens the target cache still lacks, besides the last one (a tree root / next input)."""
    return max(0, lane.n - 1 - lane.target_seen)


def measured_costs(stats: PassStats) -> tuple[PassTime, PassTime | None] | None:
    """(target, draft) pass-time fits of the latest timed passes; None before a target pass is timed.

    When every target pass so far had the same number of rows the fit cannot split fixed from per-row
    time; the line through the origin is taken then (it charges every second to the rows, so the pieces
    come out small until passes of other sizes have been seen).
    """
    recent = stats.recent()[-2 * WINDOW:]
    fits = []
    for which in ("target", "draft"):
        points = [(tokens, seconds) for kind, tokens, seconds in recent if kind == which and tokens > 0]
        fit = fit_pass_time(points)
        if fit is not None and fit.per_token == 0.0 and len({x for x, _ in points}) == 1:
            fit = PassTime(0.0, fit.fixed / points[0][0])
        fits.append(fit)
    target, draft = fits
    return None if target is None else (target, draft)


def chunk_budget(stats: PassStats, decode_rows: int, n_joining: int = 1,
                 share: float = PREFILL_SHARE) -> int | None:
    """Prompt tokens a pass over `decode_rows` decoding rows may add while `n_joining` prompts wait to
    enter (None: no limit)."""
    costs = measured_costs(stats)
    if costs is None:
        return UNTIMED_CHUNK * n_joining
    target, draft = costs
    per_token = target.per_token + (draft.per_token if draft is not None else 0.0)
    if per_token <= 0.0:
        return None
    return n_joining * max(MIN_CHUNK, int(share * target.at(decode_rows) / per_token + 1e-6))


def plan_pieces(joining: list[Lane], budget: int | None) -> tuple[list[Lane], list[Piece]]:
    """Split the lanes that have not decoded yet, in arrival order, into those that join this pass (their
    whole remaining prompt fits in `budget`) and pieces of the next ones' prompts that fill the rest of it.
    Lanes left out wait for a later pass."""
    if budget is None:
        return list(joining), []
    left, joins, pieces = budget, [], []
    for lane in joining:
        need = pending(lane)
        if need <= left:
            joins.append(lane)
            left -= need
        elif left > 0:
            pieces.append(Piece(lane, lane.target_seen + left))
            left = 0
    return joins, pieces
