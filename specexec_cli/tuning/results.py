"""What a search found: measured evaluations, the ruled-out and failed candidates, the verdict line and
the results table."""

from __future__ import annotations

from dataclasses import dataclass, field

from specexec_cli.tuning.space import Candidate


@dataclass(frozen=True)
class Evaluation:
    """One measured candidate."""

    candidate: Candidate
    tokens_per_s: float
    predicted: float | None = None
    trial: int = -1
    seconds: float = 0.0


@dataclass(frozen=True)
class EqualStreaming:
    """Plain decoding measured on the best speculative configuration's placement: the same target layers
    streamed as that configuration streams (the stand-in for a target far larger than memory)."""

    of: Candidate  # the speculative configuration whose placement it ran on
    tokens_per_s: float
    resident_layers: int | None = None


@dataclass
class SearchResult:
    evaluations: list[Evaluation]
    pruned: list[tuple[Candidate, str]] = field(default_factory=list)
    failed: list[tuple[Candidate, str]] = field(default_factory=list)
    new_evaluations: int = 0
    stop_reason: str = ""
    study_name: str = ""
    equal_streaming: EqualStreaming | None = None  # under caps: plain decoding streamed like the best
    resident_layers: dict[Candidate, int] = field(default_factory=dict)  # under caps, per measured one

    @property
    def best(self) -> Evaluation | None:
        return max(self.evaluations, key=lambda e: e.tokens_per_s, default=None)

    @property
    def best_autoregressive(self) -> Evaluation | None:
        plain = [e for e in self.evaluations if e.candidate.autoregressive]
        return max(plain, key=lambda e: e.tokens_per_s, default=None)

    @property
    def best_speculative(self) -> Evaluation | None:
        spec = [e for e in self.evaluations if not e.candidate.autoregressive]
        return max(spec, key=lambda e: e.tokens_per_s, default=None)

    def plain_baseline(self, candidate: Candidate) -> Evaluation | None:
        """Plain decoding of the same target variant (quantization and offload tier) when measured,
        else the best plain decoding."""
        same = [
            e
            for e in self.evaluations
            if e.candidate.autoregressive and e.candidate.variant == candidate.variant
        ]
        return same[0] if same else self.best_autoregressive

    def ranked(self) -> list[Evaluation]:
        return sorted(self.evaluations, key=lambda e: -e.tokens_per_s)

    def speedup(self, evaluation: Evaluation) -> float | None:
        plain = self.best_autoregressive
        return evaluation.tokens_per_s / plain.tokens_per_s if plain and plain.tokens_per_s > 0 else None

    def verdict(self) -> str:
        """One sentence: the winner, and whether speculation beats plain decoding here. Under memory caps
        plain decoding was planned without the draft (equal memory: the draft's share holds target
        layers), and the sentence also gives plain decoding streamed the same way as the best speculative
        configuration (equal streaming) when it was measured."""
        best, plain, spec = self.best, self.best_autoregressive, self.best_speculative
        if best is None:
            return "no configuration was measured"
        if plain is None:
            return f"best: {best.candidate.label()} at {best.tokens_per_s:.2f} tok/s (no plain decoding run)"
        placed = bool(plain.candidate.offload)
        if best.candidate.autoregressive:
            if spec is None:
                why = "every speculative configuration was ruled out" if self.pruned else "no speculative run"
                return f"plain autoregressive decoding: {plain.tokens_per_s:.2f} tok/s ({why})"
            where = " at equal memory" if placed else " on this machine"
            return (
                f"plain autoregressive decoding is fastest{where} ({self._plain(plain)}); "
                f"the best speculative configuration ({spec.candidate.label()}) reached "
                f"{spec.tokens_per_s:.2f} tok/s, {spec.tokens_per_s / plain.tokens_per_s:.2f}x plain decoding"
                + (" at equal memory" if placed else "") + self._streaming_clause(spec)
            )
        same = self.plain_baseline(best.candidate)
        also = ""
        if same is not plain and same.candidate.variant != best.candidate.variant:
            also = f"; fastest plain: {plain.candidate.label()} at {plain.tokens_per_s:.2f} tok/s"
        return (
            f"best: {best.candidate.label()} at {best.tokens_per_s:.2f} tok/s, "
            f"{best.tokens_per_s / same.tokens_per_s:.2f}x plain decoding"
            + (" at equal memory" if same.candidate.offload else "")
            + f" ({self._plain(same)}){also}" + self._streaming_clause(best)
        )

    def _plain(self, plain: Evaluation) -> str:
        """'1.23 tok/s', and under caps '1.23 tok/s; planned without the draft: 28 resident layers'."""
        if not plain.candidate.offload:
            return f"{plain.tokens_per_s:.2f} tok/s"
        layers = self.resident_layers.get(plain.candidate)
        held = f": {layers} resident layers" if layers is not None else ""
        return f"{plain.tokens_per_s:.2f} tok/s; planned without the draft{held}"

    def _streaming_clause(self, spec: Evaluation) -> str:
        """'; 2.47x plain decoding streamed the same way (0.50 tok/s, 9 resident layers)' when measured."""
        eq = self.equal_streaming
        if eq is None or eq.of != spec.candidate or eq.tokens_per_s <= 0:
            return ""
        layers = f", {eq.resident_layers} resident layers" if eq.resident_layers is not None else ""
        return (f"; {spec.tokens_per_s / eq.tokens_per_s:.2f}x plain decoding streamed the same way "
                f"({eq.tokens_per_s:.2f} tok/s{layers})")


def format_results(result: SearchResult, top: int = 8) -> str:
    """Table of the best configurations with predicted figures and speedup over plain decoding."""
    rows = [("#", "configuration", "tok/s", "predicted", "speedup")]
    for i, e in enumerate(result.ranked()[:top], start=1):
        speedup = result.speedup(e)
        rows.append(
            (
                str(i),
                e.candidate.label(),
                f"{e.tokens_per_s:.2f}",
                "-" if e.predicted is None else f"{e.predicted:.2f}",
                "-" if speedup is None else f"{speedup:.2f}x",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(
        f"{len(result.evaluations)} measured ({result.new_evaluations} in this run), "
        f"{len(result.pruned)} ruled out by the cost model, {len(result.failed)} failed"
    )
    lines.append(result.verdict())
    return "\n".join(lines)

