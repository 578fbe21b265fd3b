"""`specexec generate --ray local` with 1 and 2 workers (or the counts of --workers): the same MT-Bench
prompts, greedy, through a local Ray cluster started by each run; aggregate tok/s from the first worker
ready to the last result (the driver's summary line) and the whole command's wall time, with ratios
against the first worker count of the same run. Every run's outputs must equal the first's (greedy).

On one machine the workers share its cores: a 2-worker run gives each worker half of them (its torch
threads) and holds two engines' memory. The engine flags after `--` go to every run (default: the
README's streamed bundled pair, SpecExec with the int8 draft, each worker planned under 5 GiB).
A table goes to stdout, progress to stderr, the rows as JSON Lines to `--out`.

Examples:
  python scripts/bench_ray.py --workers 1,2 --n-prompts 16 --max-new-tokens 32
  python scripts/bench_ray.py --workers 1,2 -- -t path/to/target -d path/to/draft --no-chat-template
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.prompt_sets import load_prompt_set, resolve_prompt_path  # noqa: E402

DEFAULT_ENGINE_FLAGS = ["--method", "specexec", "--budget", "64", "--draft-quant", "int8",
                        "--offload", "disk", "--max-memory", "cpu=5GiB"]
SUMMARY = re.compile(r"ray: (\d+) of (\d+) prompts on (\d+) worker\(s\)(?: \([^)]*\))?, (\d+) new tokens in "
                     r"([\d.]+) s")


def log(message: str) -> None:
    print(f"[bench_ray {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_summary(stderr: str) -> dict[str, float]:
    """The driver's closing line as numbers: finished, prompts, workers_ready (those that opened the engine
    before the job ended), new_tokens, seconds."""
    match = SUMMARY.search(stderr)
    if match is None:
        raise RuntimeError("the run printed no summary line:\n" + stderr[-2000:])
    finished, prompts, workers, tokens, seconds = match.groups()
    return {"finished": int(finished), "prompts": int(prompts), "workers_ready": int(workers),
            "new_tokens": int(tokens), "seconds": float(seconds)}


def run(prompts_file: Path, workers: int, max_new_tokens: int, flags: list[str]) -> tuple[dict, list[str]]:
    command = [sys.executable, "-m", "specexec_cli", "generate", "-f", str(prompts_file), "--json",
               "-n", str(max_new_tokens), "--ray", "local", "--ray-workers", str(workers), *flags]
    log(f"{workers} worker(s): " + " ".join(command[2:]))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}:\n{result.stderr[-2000:]}")
    row = {"workers": workers, **parse_summary(result.stderr), "wall_s": round(wall, 1)}
    row["tokens_per_s"] = round(row["new_tokens"] / row["seconds"], 3) if row["seconds"] else 0.0
    records = [json.loads(line) for line in result.stdout.splitlines()]
    actors = [record["worker"]["actor"] for record in records]
    row["prompts_per_worker"] = sorted((actors.count(actor) for actor in set(actors)), reverse=True)
    return row, [record["text"] for record in records]


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| workers | prompts | per worker | new tokens | s (first ready -> last) | tok/s | x first "
             "| wall s | x first |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        per_worker = "/".join(str(count) for count in row["prompts_per_worker"])
        lines.append(f"| {row['workers']} | {row['prompts']} | {per_worker} | {row['new_tokens']} | "
                     f"{row['seconds']:.1f} | "
                     f"{row['tokens_per_s']:.2f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f} | "
                     f"{row['wall_s']:.1f} | {base['wall_s'] / row['wall_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = DEFAULT_ENGINE_FLAGS
    if "--" in argv:
        cut = argv.index("--")
        argv, flags = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="Worker counts, the first is the baseline.")
    parser.add_argument("--prompts", default=None, help="Prompt set [default: MT-Bench, ../shared/data].")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="Append each row as JSON Lines here.")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.workers.split(",")]
    texts = [text for _, text in load_prompt_set(resolve_prompt_path(args.prompts), args.n_prompts)]
    rows, first_outputs = [], None
    with tempfile.TemporaryDirectory() as folder:
        prompts_file = Path(folder) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"id": str(i), "prompt": text}) + "\n"
                                        for i, text in enumerate(texts)))
        for workers in counts:
            row, outputs = run(prompts_file, workers, args.max_new_tokens, flags)
            if first_outputs is None:
                first_outputs = outputs
            row["same_outputs"] = outputs == first_outputs
            if not row["same_outputs"]:
                log(f"warning: {workers} worker(s) wrote different text than {counts[0]} (greedy: a bug)")
            rows.append(row)
            log(json.dumps(row))
            if args.out:
                with open(args.out, "a", encoding="utf-8") as out:
                    out.write(json.dumps({**row, "engine_flags": flags}) + "\n")
    print(table(rows))
    return 0 if all(row["same_outputs"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
