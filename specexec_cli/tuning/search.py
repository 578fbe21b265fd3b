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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
from optuna.trial import Trial, TrialState

from specexec_cli.errors import SpecexecError
from specexec_cli.tuning.results import SearchResult
from specexec_cli.tuning.space import Candidate, SearchSpace, variant_name
from specexec_cli.tuning.study import (
    ATTR_CANDIDATE,
    ATTR_DUPLICATE,
    ATTR_PREDICTED,
    ATTR_REASON,
    ATTR_SECONDS,
    open_study,
    recover_interrupted,
    study_result,
)

Objective = Callable[[Candidate], float]
Predictor = Callable[[Candidate], "float | None"]
Feasibility = Callable[[Candidate], "str | None"]


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
        self.retry = recover_interrupted(study, space)
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
        plain = [c for c in space.candidates() if c.autoregressive]
        per_pair = []
        for draft in space.speculative_drafts:
            for quant, offload in space.variants:
                key = (draft, variant_name(quant, offload))
                options = [c for c in space.candidates() if c.load_key == key]
                if not options:  # a pair the planned space left out
                    continue
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
    patience: int | None = None,
) -> SearchResult:
    """Search until the study holds `n_trials` measured trials (a resumed study counts the ones it has),
    `timeout` seconds pass, `patience` trials in a row measured nothing at least 1 % faster than the
    best before them, or the sampler keeps proposing candidates that are measured or ruled out.

    The objective returns measured tokens/s; `predict` (cost model) and `infeasible` (memory check)
    are optional. Returns every measurement in the study, including earlier runs'.
    """
    study = open_study(storage, study_name, seed)
    search = _Search(study, space, objective, predict, infeasible, hopeless_ratio, climb_ratio, seeds)
    grid = set(space.candidates())
    distinct = len(grid)
    done = len(search.known)
    start, new, idle = time.perf_counter(), 0, 0
    stale = 0  # trials measured since the best improved by 1 %
    stop_reason = "trials"
    bar = _progress_bar(n_trials, done) if progress else None
    try:
        while done < n_trials:
            if timeout is not None and time.perf_counter() - start >= timeout:
                stop_reason = "timeout"
                break
            if len(grid & (search.known.keys() | search.ruled_out)) >= distinct:
                stop_reason = "space exhausted"
                break
            if search.nothing_left_worth_trying():
                stop_reason = "the cost model predicts every remaining candidate hopeless"
                break
            if not search.known and search.failures >= 4:
                stop_reason = "every trial failed"
                break
            if patience and stale >= patience:
                stop_reason = f"converged: {stale} trials in a row without a faster configuration"
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
            before = search.best
            if search.measure(trial, candidate):
                done, new, idle = done + 1, new + 1, 0
                improved = before is None or search.known[candidate] >= 1.01 * before
                stale = 0 if improved else stale + 1
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
