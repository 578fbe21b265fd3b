"""What `specexec tune` takes (`TuneOptions`), its validation, and the offload tiers it implies: the
plain description of one tuning run that the tuner's stages read (no stage imports the tuner itself)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specexec_cli.errors import UsageError
from specexec_cli.runtime.caps import parse_caps
from specexec_cli.runtime.plan import OFFLOADS
from specexec_cli.settings import WEIGHT_FORMATS
from specexec_cli.tuning.batch_workload import DEFAULT_BATCH_SIZES, MAX_BATCH_SIZE, batch_sizes_to_try
from specexec_cli.tuning.space import DEFAULT_BUDGETS, DEFAULT_PLACEMENT, UNCAPPED


@dataclass
class TuneOptions:
    """Everything `specexec tune` takes; None means "decide from the registry and the hardware"."""

    target: str
    drafts: tuple[str, ...] | None = None  # draft names; "none" and early-exit keys allowed
    quantizations: tuple[str, ...] | None = None
    early_exit_layers: tuple[int, ...] | None = None  # early-exit drafts from the target
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    n_beams: tuple[int, ...] = (8, 32, 128)
    beam_lens: tuple[int, ...] = (8, 16, UNCAPPED)  # caps on draft passes; UNCAPPED: none
    max_branch_width: int = 8
    n_trials: int = 24
    patience: int | None = 8  # stop after this many trials in a row found nothing faster (None: never)
    timeout: float | None = None  # seconds for the whole run; at least one trial runs after calibration
    prompts_file: Path | None = None
    n_prompts: int = 4
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    study: str | None = None
    storage: Path | None = None
    device: str | None = None
    profiles_dir: Path | None = None
    save: bool = True
    trial_time_limit_s: float | None = 30.0  # stop a slow measurement early (rate over what was made)
    calibration_iterations: int = 4  # SpecExec iterations per prompt for the acceptance curve
    calibration_step_s: float = 30.0  # each calibration measurement stops here with what it has
    max_memory: tuple[str, ...] = ()  # --max-memory caps (runtime/caps.py): targets load streamed
    offload: str | None = None  # auto | none | ram | disk; None: auto with --max-memory, else no tiers
    hopeless_ratio: float = 0.5  # rule out trials predicted below this x the best measured (0: never)
    progress: bool = True
    batch_prompts_file: Path | None = None  # a batch workload: also tune the batch size on it
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # capped by the number of batch prompts
    batch_new_tokens: int | None = None  # per prompt in the batch stage; None: max_new_tokens

    def validate(self) -> None:
        if self.n_trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.n_trials}")
        if self.patience is not None and self.patience < 1:
            raise UsageError(f"--patience must be >= 1, got {self.patience}")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError(f"--timeout must be > 0, got {self.timeout}")
        if self.max_new_tokens < 2:
            raise UsageError(f"--max-new-tokens must be >= 2 for tuning, got {self.max_new_tokens}")
        if self.n_prompts < 1:
            raise UsageError(f"--n-prompts must be >= 1, got {self.n_prompts}")
        for name in ("budgets", "n_beams", "beam_lens"):
            values = getattr(self, name)
            if not values or min(values) < 1 or max(values) > 4096:
                raise UsageError(f"{name.replace('_', ' ')} must lie in 1..4096")
        caps_of(self)  # a bad --max-memory fails before anything loads
        if self.offload not in (None, "auto", *OFFLOADS):
            raise UsageError(f"--offload must be one of auto, {', '.join(OFFLOADS)}; got {self.offload!r}")
        batch_sizes_to_try(self.batch_sizes, MAX_BATCH_SIZE)  # a bad --batch-sizes fails at once
        if self.calibration_step_s <= 0:
            raise UsageError(f"--step-seconds must be > 0, got {self.calibration_step_s}")
        if self.trial_time_limit_s is not None and self.trial_time_limit_s <= 0:
            raise UsageError(f"--trial-seconds must be > 0, got {self.trial_time_limit_s}")
        if self.calibration_iterations < 1:
            raise UsageError(f"--calibration-iterations must be >= 1, got {self.calibration_iterations}")
        for quant in self.quantizations or ():
            if quant not in WEIGHT_FORMATS:
                known = ", ".join(WEIGHT_FORMATS)
                raise UsageError(f"unknown quantization {quant!r}; choose from {known}")


def caps_of(options: TuneOptions) -> dict[str, int]:
    return parse_caps(options.max_memory)


def offload_tiers(options: TuneOptions) -> tuple[str, ...]:
    """The offload tiers the search places target variants in: every tier with --max-memory or
    --offload auto (the memory check rules out the ones the planner refuses), the one given, or
    none at all (DEFAULT_PLACEMENT: the loader's own placement, as without --max-memory)."""
    offload = options.offload or ("auto" if options.max_memory else None)
    if offload is None:
        return (DEFAULT_PLACEMENT,)
    return OFFLOADS if offload == "auto" else (offload,)
