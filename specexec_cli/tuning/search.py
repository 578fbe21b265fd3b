"""The tuner's search: an Optuna study (ask-and-tell, SQLite storage) over drafts, target
quantizations, tree budgets and beam shapes, steered by the cost model.

The objective is injected: any `Callable[[Candidate], float]` returning measured tokens/s, so tests
run the same logic against a synthetic function. The search itself:

1. Seeds, strongest first: plain decoding for each quantization (always a candidate), then, for each
   (draft, quantization) pair, the budget the cost model predicts best.
2. After each measured speculative trial, a local climb on that same pair while its models are
   loaded: the neighbouring budget steps (and beam shapes) of the pair's best measured point, as long
   as the pair is within reach of the best measured so far. Several budgets per load.
3. Then Optuna's TPE sampler explores the rest of the space.

Before a trial is measured it is ruled out if the cost model says it cannot fit in memory or that it is
hopeless (predicted below a fraction of the best measured). A candidate measured before is not measured
again. Trials live in SQLite, so a study interrupted by Ctrl-C or a crash resumes where it stopped:
finished trials are kept, the interrupted one is measured again.
"""

from __future__ import annotations

import math
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from specexec_cli.errors import SpecexecError
from specexec_cli.models.registry import EARLY_EXIT, early_exit_layers

NO_DRAFT = "none"
DEFAULT_BUDGETS = tuple(2**i for i in range(13))  # 1 .. 4096, log scale

Objective = Callable[["Candidate"], float]
Predictor = Callable[["Candidate"], "float | None"]
Feasibility = Callable[["Candidate"], "str | None"]


@dataclass(frozen=True, order=True)
class Candidate:
    """One point of the search space. Plain decoding has draft NO_DRAFT and budget 0."""

    draft: str
    quantization: str
    budget: int = 0
    max_n_beams: int = 0
    max_beam_len: int = 0

    @property
    def autoregressive(self) -> bool:
        return self.draft == NO_DRAFT

    @property
    def load_key(self) -> tuple[str, str]:
        """What has to be loaded to run it: trials with the same key share one load."""
        return self.draft, self.quantization

    def label(self) -> str:
        if self.autoregressive:
            return f"autoregressive {self.quantization}"
        beams = f"beams={self.max_n_beams}x{self.max_beam_len}"
        return f"{self.draft} {self.quantization} budget={self.budget} {beams}"

    def to_dict(self) -> dict:
        return {
            "draft": self.draft,
            "quantization": self.quantization,
            "budget": self.budget,
            "max_n_beams": self.max_n_beams,
            "max_beam_len": self.max_beam_len,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(
            **{key: data[key] for key in ("draft", "quantization", "budget", "max_n_beams", "max_beam_len")}
        )


def early_exit_key(base: str, n_layers: int) -> str:
    """The draft key of an early-exit draft: the first n_layers layers of `base` plus its head."""
    return f"{base}[:{n_layers}]"


def normalize_draft(name: str, target: str) -> str:
    """A draft as the search keys it: `first-layers:N` (the CLI's spelling) becomes target[:N]."""
    n_layers = early_exit_layers(name)
    return name if n_layers is None else early_exit_key(target, n_layers)


def generate_draft_name(key: str, target: str) -> str:
    """A draft key as `specexec generate --draft` takes it: target[:N] becomes `first-layers:N`."""
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
    beam_lens: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        if not self.drafts or not self.quantizations or not self.budgets:
            raise ValueError("a search space needs at least one draft, quantization and budget")
        for name in ("budgets", "n_beams", "beam_lens"):
            values = getattr(self, name)
            if list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} must be increasing positive integers")

    @property
    def speculative_drafts(self) -> tuple[str, ...]:
        return tuple(d for d in self.drafts if d != NO_DRAFT)

    def canonical(self, candidate: Candidate) -> Candidate:
        """The same behaviour with one spelling: beam shapes wider or longer than the budget act alike,
        so they collapse to the smallest such choice; plain decoding has no tree knobs at all."""
        if candidate.autoregressive:
            return Candidate(NO_DRAFT, candidate.quantization)
        return replace(
            candidate,
            max_n_beams=_collapse(candidate.max_n_beams, candidate.budget, self.n_beams),
            max_beam_len=_collapse(candidate.max_beam_len, candidate.budget, self.beam_lens),
        )

    def candidates(self) -> list[Candidate]:
        """Every distinct candidate (the exhaustive grid), plain decoding first."""
        out = [Candidate(NO_DRAFT, q) for q in self.quantizations if NO_DRAFT in self.drafts]
        seen = set(out)
        for draft in self.speculative_drafts:
            for quant in self.quantizations:
                for budget in self.budgets:
                    for beams in self.n_beams:
                        for length in self.beam_lens:
                            c = self.canonical(Candidate(draft, quant, budget, beams, length))
                            if c not in seen:
                                seen.add(c)
                                out.append(c)
        return out

    def suggest(self, trial: Trial) -> Candidate:
        """Define-by-run: ask `trial` for a candidate (enqueued parameters are honoured)."""
        draft = trial.suggest_categorical("draft", list(self.drafts))
        quant = trial.suggest_categorical("quantization", list(self.quantizations))
        if draft == NO_DRAFT:
            return Candidate(NO_DRAFT, quant)
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
        return self.canonical(Candidate(draft, quant, budget, beams, length))

    def params(self, candidate: Candidate) -> dict:
        """Optuna parameters that make `suggest` return `candidate` (for enqueue_trial)."""
        params: dict = {"draft": candidate.draft, "quantization": candidate.quantization}
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


# --- results ----------------------------------------------------------------------------------


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
        return (
            f"best: {best.candidate.label()} at {best.tokens_per_s:.2f} tok/s, "
            f"{best.tokens_per_s / plain.tokens_per_s:.2f}x plain decoding ({plain.tokens_per_s:.2f} tok/s)"
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


# --- the study --------------------------------------------------------------------------------

ATTR_CANDIDATE = "candidate"
ATTR_PREDICTED = "predicted_tokens_per_s"
ATTR_DUPLICATE = "duplicate_of"
ATTR_REASON = "reason"
ATTR_SECONDS = "seconds"


def storage_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def default_storage_path() -> Path:
    """SQLite file for tuner studies: <user data dir>/specexec/tune.db."""
    import platformdirs

    return platformdirs.user_data_path("specexec") / "tune.db"


def sqlite_storage(path: Path) -> optuna.storages.RDBStorage:
    """Optuna storage in a SQLite file, in WAL mode with synchronous=NORMAL: a commit costs no fsync,
    yet a killed process loses nothing it committed (only a power cut could drop the last trials)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path, timeout=30, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return optuna.storages.RDBStorage(storage_url(path), engine_kwargs={"creator": connect})


def open_study(storage: str | Path, study_name: str, seed: int = 0) -> optuna.Study:
    """Create or resume (load_if_exists) a maximizing study; a Path is a SQLite file. Optuna's own
    log lines are limited to warnings."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    try:
        backend = sqlite_storage(storage) if isinstance(storage, Path) else storage
        return optuna.create_study(
            storage=backend, study_name=study_name, direction="maximize", sampler=sampler, load_if_exists=True
        )
    except Exception as exc:  # sqlalchemy/optuna raise many types for a broken or locked file
        raise SpecexecError(f"cannot open tuning study {study_name!r} in {storage}: {exc}") from None


def _trial_candidate(trial: FrozenTrial) -> Candidate | None:
    data = trial.user_attrs.get(ATTR_CANDIDATE)
    return Candidate.from_dict(data) if isinstance(data, dict) else None


def study_result(study: optuna.Study) -> SearchResult:
    """Everything a study holds, as plain results (duplicates left out)."""
    result = SearchResult([], study_name=study.study_name)
    for trial in study.get_trials(deepcopy=False):
        candidate = _trial_candidate(trial)
        if candidate is None or ATTR_DUPLICATE in trial.user_attrs:
            continue
        if trial.state == TrialState.COMPLETE:
            result.evaluations.append(
                Evaluation(
                    candidate,
                    float(trial.value),
                    trial.user_attrs.get(ATTR_PREDICTED),
                    trial.number,
                    trial.user_attrs.get(ATTR_SECONDS, 0.0),
                )
            )
        elif trial.state == TrialState.PRUNED:
            result.pruned.append((candidate, trial.user_attrs.get(ATTR_REASON, "")))
        elif trial.state == TrialState.FAIL and not _interrupted(trial):
            result.failed.append((candidate, trial.user_attrs[ATTR_REASON]))
    return result


def _interrupted(trial: FrozenTrial) -> bool:
    """A trial stopped by Ctrl-C, or failed with no reason: left RUNNING by a crash, then closed."""
    return (
        trial.state == TrialState.FAIL and trial.user_attrs.get(ATTR_REASON, "interrupted") == "interrupted"
    )


def _recover_interrupted(study: optuna.Study, space: SearchSpace) -> list[Candidate]:
    """Close trials a crash left RUNNING; return every interrupted candidate, to be measured first."""
    again = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        elif not _interrupted(trial):
            continue
        candidate = _trial_candidate(trial)
        if candidate is not None and ATTR_DUPLICATE not in trial.user_attrs:
            again.append(space.canonical(candidate))
    return again


class _Search:
    """State of one run of the search loop over an open study."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        objective: Objective,
        predict: Predictor | None,
        infeasible: Feasibility | None,
        hopeless_ratio: float,
        climb_ratio: float,
        seeds: Sequence[Candidate] | None,
    ) -> None:
        self.study, self.space, self.objective = study, space, objective
        self.predict, self.infeasible = predict, infeasible
        self.hopeless_ratio, self.climb_ratio = hopeless_ratio, climb_ratio
        self.known: dict[Candidate, float] = {}  # measured value per candidate
        self.ruled_out: set[Candidate] = set()
        prior = study_result(study)
        for e in prior.evaluations:
            self.known[e.candidate] = e.tokens_per_s
        self.ruled_out.update(c for c, _ in prior.pruned)
        self.ruled_out.update(c for c, _ in prior.failed)
        self.retry = _recover_interrupted(study, space)
        self.seeds = list(seeds) if seeds is not None else self.default_seeds()
        # Speculation is judged by a measurement, not only by the model: the feasible speculative
        # candidate with the best prediction is measured even when predicted hopeless.
        self.protected = self.best_predicted_speculative()
        if self.protected is not None and self.protected not in self.seeds:
            plain = sum(1 for c in self.seeds if c.autoregressive)
            self.seeds.insert(plain, self.protected)
        self.current_key: tuple[str, str] | None = None
        self.repeated: Candidate | None = None  # last sampler proposal that was not new
        self.rng = random.Random(len(self.known))
        self.failures = 0

    @property
    def best(self) -> float | None:
        return max(self.known.values(), default=None)

    def prediction(self, candidate: Candidate) -> float | None:
        return self.predict(candidate) if self.predict is not None else None

    def default_seeds(self) -> list[Candidate]:
        """Plain decoding per quantization, then each pair's predicted-best budget, best first."""
        space = self.space
        plain = [Candidate(NO_DRAFT, q) for q in space.quantizations if NO_DRAFT in space.drafts]
        per_pair = []
        for draft in space.speculative_drafts:
            for quant in space.quantizations:
                options = [c for c in space.candidates() if c.load_key == (draft, quant)]
                scored = [(self.prediction(c), c) for c in options]
                known = [(p, c) for p, c in scored if p is not None]
                if known:
                    per_pair.append(max(known, key=lambda pc: (pc[0], -pc[1].budget)))
                else:  # no model: start in the middle of the budget range
                    per_pair.append((None, options[len(options) // 2]))
        per_pair.sort(key=lambda pc: -(pc[0] if pc[0] is not None else 0.0))
        return plain + [c for _, c in per_pair]

    def best_predicted_speculative(self) -> Candidate | None:
        if self.predict is None or any(not c.autoregressive for c in self.known):
            return None
        scored = [
            (p, c)
            for c in self.space.candidates()
            if not c.autoregressive
            and self.untried(c)
            and (self.infeasible is None or self.infeasible(c) is None)
            and (p := self.prediction(c)) is not None
        ]
        return max(scored, key=lambda pc: (pc[0], -pc[1].budget))[1] if scored else None

    def nothing_left_worth_trying(self) -> bool:
        """True when the model predicts every untried candidate hopeless (so is everything after)."""
        if self.predict is None or self.best is None or self.retry or self.hopeless_ratio <= 0:
            return False
        for candidate in self.space.candidates():
            if self.untried(candidate) and candidate != self.protected:
                predicted = self.prediction(candidate)
                if predicted is None or predicted >= self.hopeless_ratio * self.best:
                    return False
            elif candidate == self.protected and self.untried(candidate):
                return False
        return True

    def untried(self, candidate: Candidate) -> bool:
        return candidate not in self.known and candidate not in self.ruled_out

    def climb_proposal(self) -> Candidate | None:
        """A neighbour of the current pair's best measured point, if the pair is worth climbing."""
        if self.current_key is None:
            return None
        mine = {c: v for c, v in self.known.items() if c.load_key == self.current_key}
        if not mine or self.best is None:
            return None
        top, value = max(mine.items(), key=lambda cv: cv[1])
        if value < self.climb_ratio * self.best:
            return None
        for neighbour in self.space.neighbours(top):
            if self.untried(neighbour):
                return neighbour
        return None

    def explore_proposal(self) -> Candidate | None:
        """After the sampler proposed a candidate already measured or ruled out: an untried neighbour
        of it, else the untried candidate the cost model likes best, else a random untried one."""
        repeated, self.repeated = self.repeated, None
        if repeated is None:
            return None
        for neighbour in self.space.neighbours(repeated):
            if self.untried(neighbour):
                return neighbour
        untried = [c for c in self.space.candidates() if self.untried(c)]
        if not untried:
            return None
        scored = [(p, c) for c in untried if (p := self.prediction(c)) is not None]
        if scored:
            return max(scored, key=lambda pc: pc[0])[1]
        return self.rng.choice(untried)

    def next_proposal(self) -> Candidate | None:
        while self.retry:
            candidate = self.retry.pop(0)
            if self.untried(candidate):
                return candidate
        climb = self.climb_proposal()
        if climb is not None:
            return climb
        while self.seeds:
            candidate = self.space.canonical(self.seeds.pop(0))
            if self.untried(candidate):
                return candidate
        return self.explore_proposal()

    def ask(self) -> tuple[Trial, Candidate]:
        """The next trial: our own proposal when there is one (enqueued, so Optuna records it like any
        other), else whatever the sampler suggests."""
        proposal = self.next_proposal()
        if proposal is not None:
            self.study.enqueue_trial(self.space.params(proposal))
        trial = self.study.ask()
        return trial, self.space.suggest(trial)

    def screen(self, trial: Trial, candidate: Candidate) -> bool:
        """Rule the candidate out before loading anything; True when it should be measured."""
        reason = self.infeasible(candidate) if self.infeasible is not None else None
        predicted = self.prediction(candidate)
        if predicted is not None:
            trial.set_user_attr(ATTR_PREDICTED, predicted)
        if reason is None and predicted is not None and self.best is not None and candidate != self.protected:
            if predicted < self.hopeless_ratio * self.best:
                limit = f"{self.hopeless_ratio:g} x best {self.best:.2f}"
                reason = f"hopeless: predicted {predicted:.2f} tok/s < {limit}"
        if reason is None:
            return True
        trial.set_user_attr(ATTR_REASON, reason)
        self.study.tell(trial, state=TrialState.PRUNED)
        self.ruled_out.add(candidate)
        return False

    def measure(self, trial: Trial, candidate: Candidate) -> bool:
        """Run the objective; True when it produced a value."""
        start = time.perf_counter()
        try:
            value = float(self.objective(candidate))
        except KeyboardInterrupt:
            trial.set_user_attr(ATTR_REASON, "interrupted")
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # a failing configuration (e.g. out of memory) must not end the study
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            trial.set_user_attr(ATTR_REASON, f"{type(exc).__name__}: {message}"[:500])
            self.study.tell(trial, state=TrialState.FAIL)
            self.ruled_out.add(candidate)
            self.failures += 1
            print(f"specexec: trial {candidate.label()} failed: {message}", file=sys.stderr)
            return False
        if not math.isfinite(value):
            trial.set_user_attr(ATTR_REASON, f"objective returned {value}")
            self.study.tell(trial, state=TrialState.FAIL)
            self.ruled_out.add(candidate)
            return False
        trial.set_user_attr(ATTR_SECONDS, time.perf_counter() - start)
        self.study.tell(trial, value)
        self.known[candidate] = value
        if not candidate.autoregressive:
            self.current_key = candidate.load_key
        return True


def run_search(
    space: SearchSpace,
    objective: Objective,
    *,
    study_name: str,
    storage: str | Path,
    n_trials: int,
    timeout: float | None = None,
    predict: Predictor | None = None,
    infeasible: Feasibility | None = None,
    seeds: Sequence[Candidate] | None = None,
    hopeless_ratio: float = 0.5,
    climb_ratio: float = 0.8,
    max_idle_asks: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> SearchResult:
    """Search until the study holds `n_trials` measured trials (a resumed study counts the ones it has),
    `timeout` seconds pass, or the sampler keeps proposing candidates that are measured or ruled out.

    The objective returns measured tokens/s; `predict` (cost model) and `infeasible` (memory check)
    are optional. Returns every measurement in the study, including earlier runs'.
    """
    study = open_study(storage, study_name, seed)
    search = _Search(study, space, objective, predict, infeasible, hopeless_ratio, climb_ratio, seeds)
    distinct = len(space.candidates())
    done = len(search.known)
    start, new, idle = time.perf_counter(), 0, 0
    stop_reason = "trials"
    bar = _progress_bar(n_trials, done) if progress else None
    try:
        while done < n_trials:
            if timeout is not None and time.perf_counter() - start >= timeout:
                stop_reason = "timeout"
                break
            if len(search.known) + len(search.ruled_out) >= distinct:
                stop_reason = "space exhausted"
                break
            if search.nothing_left_worth_trying():
                stop_reason = "the cost model predicts every remaining candidate hopeless"
                break
            if not search.known and search.failures >= 4:
                stop_reason = "every trial failed"
                break
            if idle >= max_idle_asks:
                stop_reason = "converged: the sampler only proposes candidates already measured or ruled out"
                break
            trial, candidate = search.ask()
            trial.set_user_attr(ATTR_CANDIDATE, candidate.to_dict())
            if candidate in search.known or candidate in search.ruled_out:
                # Tell the sampler what it proposed again, then steer the next trial elsewhere.
                trial.set_user_attr(ATTR_DUPLICATE, True)
                if candidate in search.known:
                    study.tell(trial, search.known[candidate])
                else:
                    study.tell(trial, state=TrialState.PRUNED)
                search.repeated = candidate
                idle += 1
                continue
            if not search.screen(trial, candidate):
                idle += 1
                continue
            if bar is not None:
                bar.set_description_str(candidate.label()[:48])
            if search.measure(trial, candidate):
                done, new, idle = done + 1, new + 1, 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"best {search.best:.2f} tok/s")
            else:
                idle += 1
    finally:
        if bar is not None:
            bar.close()
    result = study_result(study)
    result.new_evaluations, result.stop_reason = new, stop_reason
    if not result.evaluations and result.failed:
        raise SpecexecError(f"every trial failed; the first: {result.failed[0][1]}")
    return result


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), file=sys.stderr, unit="trial", dynamic_ncols=True)
