"""The tuner's search space: a `Candidate` (one configuration) and the `SearchSpace` of choices per knob,
with the spellings of early-exit drafts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from specexec_cli.models.registry import EARLY_EXIT, early_exit_layers

if TYPE_CHECKING:  # only the search (tuning/search.py) needs optuna itself
    from optuna.trial import Trial

NO_DRAFT = "none"
INT8_SUFFIX = "@int8"  # a draft key "name@int8": the draft quantized to int8 (runtime/int8_cpu.py, CPU)
DEFAULT_BUDGETS = tuple(2**i for i in range(13))  # 1 .. 4096, log scale
# A max_beam_len at least the budget caps nothing (a tree is never deeper than its budget): this value
# stands for "no cap", where the tree grows while a draft pass pays (decoding/growth.py).
UNCAPPED = max(DEFAULT_BUDGETS)
DEFAULT_PLACEMENT = ""  # the loader's own placement (no --max-memory)

@dataclass(frozen=True, order=True)
class Candidate:
    """One point of the search space. Plain decoding has draft NO_DRAFT and budget 0.

    `offload` is the tier the target's layers are placed in under --max-memory (none, ram or disk, with
    as many resident layers as the planner allows); DEFAULT_PLACEMENT ("") means the loader's own
    choice (float variants resident, 4-bit ones planned by the runtime)."""

    draft: str
    quantization: str
    budget: int = 0
    max_n_beams: int = 0
    max_beam_len: int = 0
    offload: str = ""

    @property
    def autoregressive(self) -> bool:
        return self.draft == NO_DRAFT

    @property
    def variant(self) -> str:
        """The target variant: its quantization, and its offload tier when one is chosen."""
        return variant_name(self.quantization, self.offload)

    @property
    def load_key(self) -> tuple[str, str]:
        """What has to be loaded to run it: trials with the same key share one load."""
        return self.draft, self.variant

    def label(self) -> str:
        variant = self.quantization + (f" offload={self.offload}" if self.offload else "")
        if self.autoregressive:
            return f"autoregressive {variant}"
        depth = self.max_beam_len if self.max_beam_len < self.budget else "auto"
        beams = f"beams={self.max_n_beams}x{depth}"
        return f"{self.draft} {variant} budget={self.budget} {beams}"

    def to_dict(self) -> dict:
        data = {
            "draft": self.draft,
            "quantization": self.quantization,
            "budget": self.budget,
            "max_n_beams": self.max_n_beams,
            "max_beam_len": self.max_beam_len,
        }
        if self.offload:
            data["offload"] = self.offload
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        keys = ("draft", "quantization", "budget", "max_n_beams", "max_beam_len")
        return cls(**{key: data[key] for key in keys}, offload=data.get("offload", DEFAULT_PLACEMENT))


def variant_name(quantization: str, offload: str = "") -> str:
    """'fp32', or 'fp32@disk' for a variant placed in an offload tier."""
    return f"{quantization}@{offload}" if offload else quantization


def early_exit_key(base: str, n_layers: int) -> str:
    """The draft key of an early-exit draft: the first n_layers layers of `base` plus its head."""
    return f"{base}[:{n_layers}]"


def normalize_draft(name: str, target: str) -> str:
    """A draft as the search keys it: `first-layers:N` (the CLI's spelling) becomes target[:N]."""
    n_layers = early_exit_layers(name)
    return name if n_layers is None else early_exit_key(target, n_layers)


def split_draft_quant(key: str) -> tuple[str, str | None]:
    """('qwen2.5-coder-0.5b', 'int8') for 'qwen2.5-coder-0.5b@int8'; (key, None) for any other key."""
    if key.endswith(INT8_SUFFIX):
        return key[: -len(INT8_SUFFIX)], "int8"
    return key, None


def generate_draft_name(key: str, target: str) -> str:
    """A draft key as `specexec generate --draft` takes it: target[:N] becomes `first-layers:N`, and
    name@int8 becomes name (with --draft-quant int8)."""
    key = split_draft_quant(key)[0]
    early = parse_early_exit(key)
    if early is not None and early[0] == target:
        return f"{EARLY_EXIT}{early[1]}"
    return key


def parse_early_exit(key: str) -> tuple[str, int] | None:
    """(base, n_layers) for an early-exit draft key, None for any other key."""
    if key.endswith("]") and "[:" in key:
        base, _, rest = key.rpartition("[:")
        digits = rest[:-1]
        if digits.isdigit():
            return base, int(digits)
    return None


@dataclass(frozen=True)
class SearchSpace:
    """Choices per knob. Knobs with one choice are not searched; beam shapes only where they matter."""

    drafts: tuple[str, ...]
    quantizations: tuple[str, ...]
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    n_beams: tuple[int, ...] = (32,)
    beam_lens: tuple[int, ...] = (UNCAPPED,)
    offloads: tuple[str, ...] = (DEFAULT_PLACEMENT,)  # target tiers (--max-memory), searched when > 1
    # (draft, variant, largest budget) of each pair that can run here (tuning/space_plan.py, planned
    # before anything loads); None: every pair of the product, at every budget
    allowed: tuple[tuple[str, str, int], ...] | None = None

    def __post_init__(self) -> None:
        if not self.drafts or not self.quantizations or not self.budgets:
            raise ValueError("a search space needs at least one draft, quantization and budget")
        for name in ("budgets", "n_beams", "beam_lens"):
            values = getattr(self, name)
            if list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} must be increasing positive integers")

    @property
    def variants(self) -> list[tuple[str, str]]:
        """Target variants: (quantization, offload tier)."""
        return [(q, o) for q in self.quantizations for o in self.offloads]

    @property
    def speculative_drafts(self) -> tuple[str, ...]:
        """Drafts of the space (but plain decoding) with at least one pair that can run."""
        return tuple(d for d in self.drafts if d != NO_DRAFT and any(
            self.pair_budget(d, variant_name(q, o)) is not None for q, o in self.variants))

    @property
    def planned_variants(self) -> list[tuple[str, str]]:
        """Target variants with at least one pair that can run."""
        return [(q, o) for q, o in self.variants
                if any(self.pair_budget(d, variant_name(q, o)) is not None for d in self.drafts)]

    def pair_budget(self, draft: str, variant: str) -> int | None:
        """The largest budget (draft, variant) can run at (0 for plain decoding); None: left out."""
        if self.allowed is None:
            return 0 if draft == NO_DRAFT else max(self.budgets)
        return next((b for d, v, b in self.allowed if d == draft and v == variant), None)

    def allows(self, candidate: Candidate) -> bool:
        """Whether the planned space holds `candidate` (its pair can run, at its budget)."""
        limit = self.pair_budget(candidate.draft, candidate.variant)
        return limit is not None and (candidate.autoregressive or candidate.budget <= limit)

    def canonical(self, candidate: Candidate) -> Candidate:
        """The same behaviour with one spelling: beam shapes wider or longer than the budget act alike,
        so they collapse to the smallest such choice; plain decoding has no tree knobs at all."""
        if candidate.autoregressive:
            return Candidate(NO_DRAFT, candidate.quantization, offload=candidate.offload)
        return replace(
            candidate,
            max_n_beams=_collapse(candidate.max_n_beams, candidate.budget, self.n_beams),
            max_beam_len=_collapse(candidate.max_beam_len, candidate.budget, self.beam_lens),
        )

    def candidates(self) -> list[Candidate]:
        """Every distinct candidate (the exhaustive grid), plain decoding first (a copy of a list made
        once: the search asks for it often)."""
        if "_candidates" not in self.__dict__:
            object.__setattr__(self, "_candidates", self._grid())
        return list(self.__dict__["_candidates"])

    def _grid(self) -> list[Candidate]:
        variants = self.variants
        out = [Candidate(NO_DRAFT, q, offload=o) for q, o in variants if NO_DRAFT in self.drafts]
        out = [c for c in out if self.allows(c)]
        seen = set(out)
        for draft in self.speculative_drafts:
            for quant, offload in variants:
                for budget in self.budgets:
                    for beams in self.n_beams:
                        for length in self.beam_lens:
                            c = self.canonical(Candidate(draft, quant, budget, beams, length, offload))
                            if c not in seen and self.allows(c):
                                seen.add(c)
                                out.append(c)
        return out

    def suggest(self, trial: Trial) -> Candidate:
        """Define-by-run: ask `trial` for a candidate (enqueued parameters are honoured)."""
        draft = trial.suggest_categorical("draft", list(self.drafts))
        quant = trial.suggest_categorical("quantization", list(self.quantizations))
        offload = (
            trial.suggest_categorical("offload", list(self.offloads))
            if len(self.offloads) > 1
            else self.offloads[0]
        )
        if draft == NO_DRAFT:
            return Candidate(NO_DRAFT, quant, offload=offload)
        budget = self.budgets[trial.suggest_int("budget_step", 0, len(self.budgets) - 1)]
        beams = (
            self.n_beams[trial.suggest_int("beams_step", 0, len(self.n_beams) - 1)]
            if len(self.n_beams) > 1
            else self.n_beams[0]
        )
        length = (
            self.beam_lens[trial.suggest_int("beam_len_step", 0, len(self.beam_lens) - 1)]
            if len(self.beam_lens) > 1
            else self.beam_lens[0]
        )
        return self.canonical(Candidate(draft, quant, budget, beams, length, offload))

    def params(self, candidate: Candidate) -> dict:
        """Optuna parameters that make `suggest` return `candidate` (for enqueue_trial)."""
        params: dict = {"draft": candidate.draft, "quantization": candidate.quantization}
        if len(self.offloads) > 1:
            params["offload"] = candidate.offload
        if candidate.autoregressive:
            return params
        params["budget_step"] = self.budgets.index(candidate.budget)
        if len(self.n_beams) > 1:
            params["beams_step"] = self.n_beams.index(candidate.max_n_beams)
        if len(self.beam_lens) > 1:
            params["beam_len_step"] = self.beam_lens.index(candidate.max_beam_len)
        return params

    def neighbours(self, candidate: Candidate) -> list[Candidate]:
        """Candidates one step away in budget, then in beam shape, on the same load key."""
        if candidate.autoregressive:
            return []
        out = []
        for field_name, choices in (
            ("budget", self.budgets),
            ("max_n_beams", self.n_beams),
            ("max_beam_len", self.beam_lens),
        ):
            value = getattr(candidate, field_name)
            i = choices.index(value) if value in choices else None
            if i is None:
                continue
            for j in (i + 1, i - 1):
                if 0 <= j < len(choices):
                    c = self.canonical(replace(candidate, **{field_name: choices[j]}))
                    if c != candidate and c not in out:
                        out.append(c)
        return out


def _collapse(value: int, budget: int, choices: tuple[int, ...]) -> int:
    """Choices >= budget behave alike: map them to the smallest of them."""
    if value < budget:
        return value
    at_least = [c for c in choices if c >= budget]
    return min(at_least) if at_least else value

