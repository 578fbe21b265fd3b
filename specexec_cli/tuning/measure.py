"""Short measurements that feed the cost model.

- `measure_forward_curve`: a model's forward time at a few batch sizes behind a fixed context (the
  target's knee, the draft's pass time).
- `measure_streamed`: a target whose layers stream, at a few batch sizes, split into compute and the
  time blocked on reads, so that cost_model.streamed_forward_s predicts every other batch size.
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
from specexec_cli.decoding.lanes import Lane
from specexec_cli.decoding.sampling import TokenDraws
from specexec_cli.decoding.specexec import SpecExecDecoder, acceptance_curve
from specexec_cli.decoding.tree import Tree
from specexec_cli.tuning.cost_model import AcceptanceCurve, LatencyCurve, streamed_curve
from specexec_cli.tuning.progress import StepProgress

# --- latency ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed_forwards(
    model: torch.nn.Module,
    batches: list[int],
    context: int = 64,
    repeats: int = 2,
    time_limit_s: float = 20.0,
    progress: StepProgress | None = None,
) -> dict[int, tuple[float, float]]:
    """{batch: (seconds, seconds blocked on layer loads)} of the best of `repeats` forwards of `batch`
    new tokens behind `context` cached ones (the wait is 0 for a model that does not stream).

    Batch sizes are measured in increasing order while they fit in `time_limit_s`: a batch whose time
    could overrun what is left (the last measured pass scaled by the token counts) is not run, nor any
    larger one. The latency curve extrapolates linearly past the last measured batch,
    which is where a pass is compute-bound: the reason the large ones were too slow to time.
    """
    device = model.device
    engine = getattr(model, "offload_engine", None)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = new_cache()
    prefix = torch.randint(vocab, (context,), generator=generator).to(device)
    forward(model, cache, prefix, torch.arange(context, device=device), causal_pattern(0, context, device))
    points: dict[int, tuple[float, float]] = {}
    kept_none = torch.zeros(0, dtype=torch.long, device=device)
    start = time.perf_counter()
    for batch in sorted(set(batches)):
        left = time_limit_s - (time.perf_counter() - start)
        if points:
            # a pass grows at most in proportion to its tokens (a flat, read-bound start included), so
            # the last pass scaled up bounds the next one from above
            b1, (s1, _) = max(points.items())
            if s1 * batch / b1 > left:
                break
        ids = torch.randint(vocab, (batch,), generator=generator).to(device)
        positions = torch.arange(context, context + batch, device=device)
        attend = causal_pattern(context, batch, device)
        best = (float("inf"), 0.0)
        for i in range(repeats):
            if i and time.perf_counter() - start > time_limit_s:
                break  # one pass of this batch is enough when the time is up
            _sync(device)
            wait0 = engine.stats.load_wait_s if engine is not None else 0.0
            t0 = time.perf_counter()
            forward(model, cache, ids, positions, attend)
            _sync(device)
            elapsed = time.perf_counter() - t0
            wait = engine.stats.load_wait_s - wait0 if engine is not None else 0.0
            best = min(best, (elapsed, wait))
            keep_tail(cache, context, kept_none)
        points[batch] = best
        if progress is not None:
            progress.advance()
    return points


def measure_forward_curve(
    model: torch.nn.Module,
    batches: list[int],
    context: int = 64,
    repeats: int = 2,
    time_limit_s: float = 20.0,
    progress: StepProgress | None = None,
) -> LatencyCurve:
    """Best-of-`repeats` forward time for each batch size (see `timed_forwards`)."""
    points = timed_forwards(model, batches, context, repeats, time_limit_s, progress)
    return LatencyCurve.from_points({b: seconds for b, (seconds, _) in points.items()})


def streamed_layers(model: torch.nn.Module) -> tuple[int, int, float] | None:
    """(n_layers, resident layers, bytes per streamed layer) of a model whose layers stream; None when
    every layer is in memory."""
    engine = getattr(model, "offload_engine", None)
    if engine is None or not engine.streamed:
        return None
    streamed_bytes = sum(engine.layers[i].layout.nbytes for i in engine.streamed)
    n_layers = len(engine.layers)
    return n_layers, n_layers - len(engine.streamed), streamed_bytes / len(engine.streamed)


@dataclass(frozen=True)
class StreamedMeasurement:
    """A streamed target measured at a few batch sizes, split into the cost model's two terms."""

    measured: LatencyCurve  # wall time per pass
    compute: LatencyCurve  # wall time minus the time blocked on layer reads
    n_layers: int
    resident_layers: int
    layer_bytes: float  # bytes read per streamed layer
    read_bandwidth: float  # streamed bytes of a one-token pass over its time: the tier's effective rate

    def curve(self, batches: list[int], resident_layers: int | None = None) -> LatencyCurve:
        """Predicted forward times at `batches` (cost_model.streamed_forward_s), with the resident layers
        it was measured with, or another placement's `resident_layers`."""
        resident = self.resident_layers if resident_layers is None else resident_layers
        return streamed_curve(self.compute, self.layer_bytes, self.n_layers, resident, self.read_bandwidth,
                              batches)

    def to_dict(self) -> dict:
        return {
            "measured": self.measured.to_dict(),
            "compute": self.compute.to_dict(),
            "n_layers": self.n_layers,
            "resident_layers": self.resident_layers,
            "layer_bytes": self.layer_bytes,
            "read_bandwidth": self.read_bandwidth,
        }

    @classmethod
    def from_dict(cls, data: dict) -> StreamedMeasurement:
        return cls(
            LatencyCurve.from_dict(data["measured"]),
            LatencyCurve.from_dict(data["compute"]),
            int(data["n_layers"]),
            int(data["resident_layers"]),
            float(data["layer_bytes"]),
            float(data["read_bandwidth"]),
        )


def measure_streamed(
    model: torch.nn.Module, batches: list[int], time_limit_s: float = 60.0,
    progress: StepProgress | None = None,
) -> StreamedMeasurement:
    """Time a streamed model at a few batch sizes (1 among them) and split each pass into compute and
    waiting for reads. A one-token pass reads every streamed layer once: its time bounds the read time
    from above (it is the read time when the pass waited on reads), which is what the bandwidth keeps."""
    layers = streamed_layers(model)
    if layers is None:
        raise ValueError("measure_streamed needs a model whose layers stream")
    n_layers, resident, layer_bytes = layers
    points = timed_forwards(model, sorted({1, *batches}), time_limit_s=time_limit_s, progress=progress)
    measured = LatencyCurve.from_points({b: s for b, (s, _) in points.items()})
    compute = LatencyCurve.from_points({b: max(s - w, 0.05 * s) for b, (s, w) in points.items()})
    read_bandwidth = (n_layers - resident) * layer_bytes / measured.at(1)
    return StreamedMeasurement(measured, compute, n_layers, resident, layer_bytes, read_bandwidth)


# --- acceptance -------------------------------------------------------------------------------


def depth_curve(tree: Tree) -> torch.Tensor:
    """For K = 1..size-1: the depth of the subtree made of the K best nodes by draft score."""
    size = tree.size
    order = torch.sort(tree.scores[1:size], descending=True, stable=True).indices + 1
    return torch.cummax(tree.depths[order].double(), dim=0).values


class _CalibrationDecoder(SpecExecDecoder):
    """SpecExecDecoder recording, for each iteration, G(K) and the top-K tree depth."""

    def __init__(self, target, draft, config: GenerationConfig) -> None:
        super().__init__(target, draft, config)
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
    time_limit_s: float | None = None,
    progress: StepProgress | None = None,
) -> AcceptanceMeasurement:
    """G(K) for K = 0..config.tree.budget, averaged over iterations of SpecExec on `prompts` [1, L].

    Greedy configs score a node 1 where the target's argmax at its parent is its token; sampling
    configs use the target probability of the node's token (the brief's expected-tokens formula).
    With `time_limit_s`, trees stop being grown once it is spent (the first tree of every prompt is
    always measured, so each prompt counts): the curve is the mean of the trees measured.
    """
    curves, depths = [], []
    iterations = 0
    host = draft_passes = 0.0
    start = time.perf_counter()
    for ids in prompts:
        decoder = _CalibrationDecoder(target, draft, config)
        device = target.device
        lane = Lane(key=0, sequence=ids.reshape(-1).to(device), draws=TokenDraws(config.seed, device))
        t0 = time.perf_counter()
        for i in range(iterations_per_prompt):
            if i and time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                break
            (emitted,) = decoder.step([lane])
            lane.extend(emitted)
            if progress is not None:
                progress.advance()
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
