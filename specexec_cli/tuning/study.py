"""Tuner studies in SQLite: opening / resuming an Optuna study, reading it back as results, and
recovering trials a Ctrl-C or a crash interrupted."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from specexec_cli.errors import SpecexecError
from specexec_cli.tuning.results import Evaluation, SearchResult
from specexec_cli.tuning.space import Candidate, SearchSpace

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


def trial_candidate(trial: FrozenTrial) -> Candidate | None:
    data = trial.user_attrs.get(ATTR_CANDIDATE)
    return Candidate.from_dict(data) if isinstance(data, dict) else None


def study_result(study: optuna.Study) -> SearchResult:
    """Everything a study holds, as plain results (duplicates left out)."""
    result = SearchResult([], study_name=study.study_name)
    for trial in study.get_trials(deepcopy=False):
        candidate = trial_candidate(trial)
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
        elif trial.state == TrialState.FAIL and not interrupted(trial):
            result.failed.append((candidate, trial.user_attrs[ATTR_REASON]))
    return result


def interrupted(trial: FrozenTrial) -> bool:
    """A trial stopped by Ctrl-C, or failed with no reason: left RUNNING by a crash, then closed."""
    return (
        trial.state == TrialState.FAIL and trial.user_attrs.get(ATTR_REASON, "interrupted") == "interrupted"
    )


def recover_interrupted(study: optuna.Study, space: SearchSpace) -> list[Candidate]:
    """Close trials a crash left RUNNING; return every interrupted candidate, to be measured first."""
    again = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        elif not interrupted(trial):
            continue
        candidate = trial_candidate(trial)
        if candidate is not None and ATTR_DUPLICATE not in trial.user_attrs:
            again.append(space.canonical(candidate))
    return again

