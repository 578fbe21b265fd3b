"""A results file that a killed batch job resumes: `specexec generate -f PROMPTS -o FILE [--resume]`.

Each finished result is appended to FILE as one complete JSON line, flushed and synced to disk before the
next, in the order results finish; nothing waits in memory, so a SIGKILL loses at most the line being
written. `--resume` reads FILE back: every id already there is done and is not run again; a torn last line
(the job was killed while writing it) is cut off and its prompt runs again. When the job completes, FILE
is rewritten in input order (to a temporary file, then renamed) unless the run is unordered.

A line's id is its `custom_id` (OpenAI Batch API output lines) or its `id` (generate's JSON Lines), so
the prompts' ids must be unique in the input (`check_unique_ids`).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from specexec_cli.errors import UsageError


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_unique_ids(ids: Sequence[str]) -> None:
    """A results file keys its lines by id: the input must not repeat one (a one-line UsageError)."""
    repeated = [key for key, count in Counter(ids).items() if count > 1]
    if repeated:
        named = ", ".join(repr(key) for key in repeated[:5]) + (" ..." if len(repeated) > 5 else "")
        raise UsageError(f"-o/--output needs a unique id per prompt; repeated: {named}")


def line_id(record: object) -> str | None:
    """The prompt id a results line answers (None: not a results line)."""
    if not isinstance(record, dict):
        return None
    key = record.get("custom_id", record.get("id"))
    return str(key) if key is not None else None


class ResultsFile:
    """FILE as a text stream for the run's writers (`write` takes complete lines, `flush` syncs them),
    plus what it already held (`done`: id -> line)."""

    def __init__(self, path: str | os.PathLike, resume: bool) -> None:
        self.path = Path(path)
        self.done: dict[str, str] = {}
        self.added = 0
        self._pending = ""
        if self.path.is_dir():
            raise UsageError(f"-o {self.path}: is a folder")
        if self.path.exists() and self.path.stat().st_size > 0:
            if not resume:
                raise UsageError(f"-o {self.path} already holds results: pass --resume to finish that job, "
                                 "or give another file")
            self._read()
        elif resume and not self.path.exists():
            log(f"--resume: {self.path} does not exist yet; starting the job")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole job

    def _read(self) -> None:
        raw = self.path.read_bytes()
        body, newline, tail = raw.rpartition(b"\n")
        if not newline:  # no complete line at all
            body, tail = b"", raw
        for number, line in enumerate(body.split(b"\n") if body else [], 1):
            if not line.strip():
                continue
            try:
                key = line_id(json.loads(line))
            except ValueError:
                key = None
            if key is None:
                raise UsageError(f"{self.path}:{number}: not a results line of specexec generate; --resume "
                                 "needs the file this job wrote")
            self.done[key] = line.decode("utf-8") + "\n"
        if tail:
            log(f"warning: {self.path}: the last line is incomplete (the job stopped while writing it); "
                "its prompt runs again")
            with open(self.path, "r+b") as file:
                file.truncate(len(raw) - len(tail))

    def write(self, text: str) -> None:
        """Append complete lines (a partial one waits for its newline)."""
        complete, newline, rest = (self._pending + text).rpartition("\n")
        self._pending = rest
        if not newline:
            return
        for line in complete.split("\n"):
            key = line_id(json.loads(line))
            if key is None:
                raise ValueError(f"not a results line: {line[:80]!r}")
            self.file.write(line + "\n")
            self.done[key] = line + "\n"
            self.added += 1

    def flush(self) -> None:
        """On disk before the next result: a kill after this loses nothing written."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self, order: Sequence[str] | None = None) -> None:
        """Close FILE; given the input's ids and every one of them done, rewrite FILE in that order."""
        self.flush()
        self.file.close()
        if order is None or any(key not in self.done for key in order):
            return
        staging = self.path.with_name(self.path.name + ".ordering")
        with open(staging, "w", encoding="utf-8") as file:
            file.writelines(self.done[key] for key in order)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, self.path)
