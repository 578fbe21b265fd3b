"""Short measurements that feed the cost model.

- `measure_forward_curve`: a model's forward time at a few batch sizes behind a fixed context (the
  target's knee, the draft's pass time).
- `measure_acceptance`: the pair's acceptance curve G(K) for every K up to one large budget, from
  one SpecExec run (every smaller budget's tree is the top-K subset of it), and the tree depth of the
  top-K subset (a lower bound on draft passes), plus host overhead per iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.forward import causal_pattern, forward, new_cache
from specexec_cli.decoding.kv import keep_tail
from specexec_cli.decoding.specexec import SpecExecDecoder, acceptance_curve
from specexec_cli.decoding.tree import Tree
from specexec_cli.tuning.cost_model import AcceptanceCurve, LatencyCurve

# --- latency ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_forward_curve(
    model: torch.nn.Module,
    batches: list[int],
    context: int = 64,
    repeats: int = 2,
    time_limit_s: float = 20.0,
) -> LatencyCurve:
    """Best-of-`repeats` forward time for each batch size (new tokens behind `context` cached ones).

    Batch sizes are measured in increasing order until `time_limit_s` is spent; then the largest one
    is still measured once, so that the curve interpolates over the whole range instead of
    extrapolating from its first points.
    """
    device = model.device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = new_cache()
    prefix = torch.randint(vocab, (context,), generator=generator).to(device)
    forward(model, cache, prefix, torch.arange(context, device=device), causal_pattern(0, context, device))
    points: dict[int, float] = {}
    kept_none = torch.zeros(0, dtype=torch.long, device=device)
    start = time.perf_counter()
    ordered = sorted(set(batches))
    for batch in ordered:
        out_of_time = time.perf_counter() - start > time_limit_s
        if out_of_time and batch != ordered[-1]:
            continue
        ids = torch.randint(vocab, (batch,), generator=generator).to(device)
        positions = torch.arange(context, context + batch, device=device)
        attend = causal_pattern(context, batch, device)
        best = float("inf")
        for _ in range(1 if out_of_time else repeats):
            _sync(device)
            t0 = time.perf_counter()
            forward(model, cache, ids, positions, attend)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            keep_tail(cache, context, kept_none)
        points[batch] = best
    return LatencyCurve.from_points(points)


# --- acceptance -------------------------------------------------------------------------------


def depth_curve(tree: Tree) -> torch.Tensor:
    """For K = 1..size-1: the depth of the subtree made of the K best nodes by draft score."""
    size = tree.size
    order = torch.sort(tree.scores[1:size], descending=True, stable=True).indices + 1
    return torch.cummax(tree.depths[order].double(), dim=0).values


class _CalibrationDecoder(SpecExecDecoder):
    """SpecExecDecoder recording, for each iteration, G(K) and the top-K tree depth."""

    def __init__(self, target, draft, config: GenerationConfig) -> None:
        super().__init__(target, draft, config, generator=None)
        self.curves: list[torch.Tensor] = []
        self.depth_curves: list[torch.Tensor] = []

    def observe(self, tree: Tree, logits: torch.Tensor) -> None:
        self.curves.append(acceptance_curve(tree, logits, self.config.sampling).cpu())
        self.depth_curves.append(depth_curve(tree).cpu())


@dataclass(frozen=True)
class AcceptanceMeasurement:
    curve: AcceptanceCurve
    iterations: int
    host_s_per_iteration: float
    draft_passes_per_iteration: float
    seconds: float

    def to_dict(self) -> dict:
        return {
            **self.curve.to_dict(),
            "iterations": self.iterations,
            "host_s_per_iteration": self.host_s_per_iteration,
            "draft_passes_per_iteration": self.draft_passes_per_iteration,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> AcceptanceMeasurement:
        return cls(
            AcceptanceCurve.from_dict(data),
            int(data["iterations"]),
            float(data["host_s_per_iteration"]),
            float(data["draft_passes_per_iteration"]),
            float(data["seconds"]),
        )


def measure_acceptance(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    prompts: list[torch.Tensor],
    config: GenerationConfig,
    iterations_per_prompt: int = 4,
) -> AcceptanceMeasurement:
    """G(K) for K = 0..config.tree.budget, averaged over iterations of SpecExec on `prompts` [1, L].

    Greedy configs score a node 1 where the target's argmax at its parent is its token; sampling
    configs use the target probability of the node's token (the brief's expected-tokens formula).
    """
    curves, depths = [], []
    iterations = 0
    host = draft_passes = 0.0
    start = time.perf_counter()
    for ids in prompts:
        decoder = _CalibrationDecoder(target, draft, config)
        sequence = ids.reshape(-1).to(target.device)
        t0 = time.perf_counter()
        for _ in range(iterations_per_prompt):
            emitted = decoder.step(sequence)
            sequence = torch.cat(
                [sequence, torch.tensor(emitted, dtype=sequence.dtype, device=sequence.device)]
            )
        elapsed = time.perf_counter() - t0
        stats = decoder.stats
        host += max(0.0, elapsed - stats.target_s - stats.draft_s)
        draft_passes += stats.draft_passes
        iterations += stats.iterations
        curves += [c.tolist() for c in decoder.curves]
        depths += [d.tolist() for d in decoder.depth_curves]
    return AcceptanceMeasurement(
        curve=AcceptanceCurve.from_iterations(curves, depths),
        iterations=iterations,
        host_s_per_iteration=host / max(1, iterations),
        draft_passes_per_iteration=draft_passes / max(1, iterations),
        seconds=time.perf_counter() - start,
    )
