"""Subprocess drivers for tests/test_faults.py: small programs that a test starts, kills and restarts.

    python tests/fault_drivers.py convert DEST SLEEP       convert_gguf with a fake, slow transformers
    python tests/fault_drivers.py tune DB LOG SLEEP N      run_search with a synthetic objective
    python tests/fault_drivers.py save-profile DIR BUDGET N  save the same profile N times
    python tests/fault_drivers.py serve MARKERS ARGS...      `specexec serve ARGS` with faults to inject

None of them but `serve` imports torch or loads a model, so each starts in about a second. `serve` runs
the real server with two switches in the folder MARKERS: while a file `fail-pass` is there every target
pass raises (a pass that fails); when a file `crash` appears the engine thread meets an error that is
not an Exception (a bug, or an interpreter fault), which ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from pathlib import Path

WEIGHT_FILES = ("model-00001.safetensors", "model-00002.safetensors", "config.json")
FILE_BYTES = 64 << 10


class FakeTensor:
    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n

    def element_size(self) -> int:
        return 4


class FakeGenerationConfig(types.SimpleNamespace):
    def save_pretrained(self, folder: str) -> None:
        Path(folder, "generation_config.json").write_text(json.dumps({"eos_token_id": self.eos_token_id}))


class FakeModel:
    """Just what convert_gguf uses of a transformers model; save_pretrained writes slowly."""

    sleep = 0.0
    fail_after: int | None = None  # raise ENOSPC after this many files

    def __init__(self) -> None:
        self.config = types.SimpleNamespace(model_type="fake")
        self.generation_config = FakeGenerationConfig(eos_token_id=1)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> FakeModel:
        return cls()

    @classmethod
    def from_config(cls, config, **kwargs) -> FakeModel:
        return cls()

    def state_dict(self) -> dict[str, FakeTensor]:
        return {"w": FakeTensor(FILE_BYTES // 4)}

    def load_state_dict(self, *args, **kwargs) -> None:
        return None

    def to(self, dtype) -> FakeModel:
        return self

    def save_pretrained(self, folder: str) -> None:
        for i, name in enumerate(WEIGHT_FILES):
            if self.fail_after is not None and i >= self.fail_after:
                import errno

                raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, name))
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"x" * FILE_BYTES)
            time.sleep(self.sleep)


class FakeTokenizer:
    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> FakeTokenizer:
        return cls()

    def save_pretrained(self, folder: str) -> None:
        Path(folder, "tokenizer.json").write_text("{}")


def fake_modules() -> dict[str, types.ModuleType]:
    """`torch` and `transformers` stand-ins, enough for bundled.convert_gguf."""
    torch = types.ModuleType("torch")
    torch.float32 = "float32"
    torch.float16 = "float16"
    torch.device = lambda name: contextlib.nullcontext()
    transformers = types.ModuleType("transformers")
    transformers.AutoModelForCausalLM = FakeModel
    transformers.AutoTokenizer = FakeTokenizer
    return {"torch": torch, "transformers": transformers}


def folder_is_complete(folder: Path) -> bool:
    """Every file a conversion writes is there at full size."""
    sizes = [(folder / name).stat().st_size for name in WEIGHT_FILES]
    return all(size == FILE_BYTES for size in sizes) and (folder / "tokenizer.json").is_file()


def convert(dest: str, sleep: str) -> None:
    sys.modules.update(fake_modules())
    from specexec_cli.models import bundled

    FakeModel.sleep = float(sleep)
    folder = bundled.convert_gguf(Path("/nonexistent"), "fake.gguf", Path(dest), {"model": "fake"})
    assert bundled.is_converted(folder) and folder_is_complete(folder)
    print("converted", flush=True)


def tune(db: str, log: str, sleep: str, n_trials: str) -> None:
    from specexec_cli.tuning.search import Candidate, SearchSpace, run_search

    space = SearchSpace(drafts=("none", "small"), quantizations=("fp32",), budgets=(1, 2, 4, 8, 16, 32),
                        n_beams=(8,), beam_lens=(8,))

    def objective(candidate: Candidate) -> float:
        time.sleep(float(sleep))
        with open(log, "a") as f:
            f.write(json.dumps(candidate.to_dict()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return 1.0 + (candidate.budget or 0) / 10

    run_search(space, objective, study_name="killed", storage=Path(db), n_trials=int(n_trials),
               progress=False)
    print("done", flush=True)


def save_profile(directory: str, budget: str, times: str) -> None:
    from specexec_cli import profiles

    for _ in range(int(times)):
        profile = profiles.Profile(target="fake", settings={"method": "specexec", "budget": int(budget)},
                                   fingerprint="abc123")
        profiles.save_profile(profile, Path(directory))
    print("saved", flush=True)


class InjectedCrash(BaseException):
    """What ends the engine thread: no `except Exception` catches it."""


def serve(markers: str, *args: str) -> None:
    from specexec_cli.cli import main
    from specexec_cli.decoding import generate
    from specexec_cli.serve import scheduler

    folder = Path(markers)
    real_step, real_scheduler_step = generate.Batch.step, scheduler.Scheduler._step

    def step(self):
        if (folder / "fail-pass").exists():
            raise RuntimeError("injected: the pass failed")
        return real_step(self)

    def scheduler_step(self):
        if (folder / "crash").exists():
            raise InjectedCrash("injected: the engine thread crashed")
        return real_scheduler_step(self)

    generate.Batch.step = step
    scheduler.Scheduler._step = scheduler_step
    main(list(args))  # the command line after `python -m specexec_cli`, "serve" first


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"convert": convert, "tune": tune, "save-profile": save_profile, "serve": serve}[command](*rest)
