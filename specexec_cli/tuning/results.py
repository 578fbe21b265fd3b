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


@dataclass
class SearchResult:
    evaluations: list[Evaluation]
    pruned: list[tuple[Candidate, str]] = field(default_factory=list)
    failed: list[tuple[Candidate, str]] = field(default_factory=list)
    new_evaluations: int = 0
    stop_reason: str = ""
    study_name: str = ""

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
        """One sentence: the winner, and whether speculation beats plain decoding here."""
        best, plain, spec = self.best, self.best_autoregressive, self.best_speculative
        if best is None:
            return "no configuration was measured"
        if plain is None:
            return f"best: {best.candidate.label()} at {best.tokens_per_s:.2f} tok/s (no plain decoding run)"
        if best.candidate.autoregressive:
            if spec is None:
                why = "every speculative configuration was ruled out" if self.pruned else "no speculative run"
                return f"plain autoregressive decoding: {plain.tokens_per_s:.2f} tok/s ({why})"
            return (
                f"plain autoregressive decoding is fastest on this machine ({plain.tokens_per_s:.2f} tok/s); "
                f"the best speculative configuration ({spec.candidate.label()}) reached "
                f"{spec.tokens_per_s:.2f} tok/s, {spec.tokens_per_s / plain.tokens_per_s:.2f}x plain decoding"
            )
        baseline, also = "plain decoding", ""
        same = self.plain_baseline(best.candidate)
        if best.candidate.offload and same.candidate.variant == best.candidate.variant:
            if same is not plain:
                also = f"; fastest plain: {plain.candidate.label()} at {plain.tokens_per_s:.2f} tok/s"
            plain, baseline = same, "plain decoding streamed the same way"  # the fair comparison
        return (
            f"best: {best.candidate.label()} at {best.tokens_per_s:.2f} tok/s, "
            f"{best.tokens_per_s / plain.tokens_per_s:.2f}x {baseline} ({plain.tokens_per_s:.2f} tok/s){also}"
        )


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

