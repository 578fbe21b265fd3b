"""`specexec serve` under 1, 2, 4 and 8 concurrent clients: aggregate tok/s, time to first token,
per-request tok/s and tokens per target pass, from a real server and streaming HTTP clients.

The server runs in a subprocess with the flags after `--` (default: the bundled pair with every target
layer streamed from disk, as the README's equal-streaming comparison). Each concurrency level sends the
same MT-Bench prompts (chat template, greedy), `--requests` of them, shared round robin by that many
clients, each sending its share one request after another (client i starting i * `--stagger` s in);
ratios are against the 1-client level of the same run. A table goes to stdout, progress to stderr, the
rows as JSON to `--out`.

Examples:
  python scripts/bench_serve.py --clients 1,2,4,8 --requests 8 --max-tokens 32
  python scripts/bench_serve.py --clients 1,8 -- --max-batch 8 --offload ram --resident-layers 0
  python scripts/bench_serve.py --clients 1,8 --requests 16 --stagger 3   # joining-heavy: each client
      sends 2 requests back to back, the clients start 3 s apart, so requests join while others decode
  python scripts/bench_serve.py --clients 1,8 --requests 16 --stagger 3 --prompts oasst --conversations \
      -- <the default flags> --max-prompt-tokens 2048   # the same with long prompts (chat histories)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.prompt_sets import load_conversations, load_prompt_set, resolve_prompt_path  # noqa: E402

# SpecExec named: without --method the shipped CPU profile picks plain decoding for a resident target;
# --no-profile: the figures do not depend on what `specexec tune` saved on this machine
DEFAULT_SERVER_FLAGS = ["--no-profile", "--method", "specexec", "--budget", "64", "--draft-quant", "int8",
                        "--offload", "disk", "--resident-layers", "0", "--max-memory", "cpu=6GiB",
                        "--max-batch", "8", "--max-prompt-tokens", "1024", "--max-tokens", "256"]


def log(message: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start_server(flags: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "specexec_cli", "serve", "--port", "0", *flags]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log("starting: " + " ".join(command[2:]))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    url: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            if "Loading weights" not in line and "joining" not in line:
                print(line, end="", file=sys.stderr)
            match = re.search(r"on (http://\S+:\d+)/v1", line)
            if match:
                url.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(1800)
    if not url:
        process.kill()
        raise SystemExit("error: the server did not start")
    return process, url[0]


def metric(httpx, url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    match = re.search(rf"^specexec_{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def one_request(httpx, url: str, prompt: str | list[dict], max_tokens: int) -> dict:
    """A streamed chat request; returns its tokens, time to first text, total time and its longest wait
    between two pieces of text (a stall: other requests' prompts entering the passes it shares)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    texts, usage = [], None  # times of the text events
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                texts.append(time.perf_counter() - start)
    seconds = time.perf_counter() - start
    tokens = usage["completion_tokens"] if usage else 0
    gaps = [b - a for a, b in zip(texts, texts[1:], strict=False)]
    return {"tokens": tokens, "ttft_s": texts[0] if texts else seconds, "seconds": seconds,
            "max_stall_s": max(gaps, default=0.0)}


def client(httpx, url: str, prompts: list, max_tokens: int, delay_s: float) -> list[dict]:
    """One client: waits `delay_s`, then sends its prompts one after another."""
    time.sleep(delay_s)
    return [one_request(httpx, url, prompt, max_tokens) for prompt in prompts]


def level(httpx, url: str, prompts: list, clients: int, max_tokens: int, stagger_s: float = 0.0) -> dict:
    """`clients` clients share `prompts` round robin; client i starts i * stagger_s seconds in."""
    passes_before = metric(httpx, url, "target_passes_total")
    emitted_before = metric(httpx, url, "emitted_tokens_total")
    pieces_before = metric(httpx, url, "prefill_pieces_total")
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, httpx, url, prompts[i::clients], max_tokens, i * stagger_s)
                   for i in range(clients)]
        results = [r for future in futures for r in future.result()]
    wall = time.perf_counter() - start
    passes = metric(httpx, url, "target_passes_total") - passes_before
    emitted = metric(httpx, url, "emitted_tokens_total") - emitted_before
    pieces = metric(httpx, url, "prefill_pieces_total") - pieces_before
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft_s"] for r in results)
    return {"clients": clients, "requests": len(results), "stagger_s": stagger_s, "tokens": tokens,
            "wall_s": wall,
            "aggregate_tokens_per_s": tokens / wall,
            "mean_ttft_s": sum(ttfts) / len(ttfts), "max_ttft_s": ttfts[-1],
            "mean_max_stall_s": sum(r["max_stall_s"] for r in results) / len(results),
            "max_stall_s": max(r["max_stall_s"] for r in results),
            "per_request_tokens_per_s": sum(r["tokens"] / r["seconds"] for r in results) / len(results),
            "target_passes": passes, "tokens_per_target_pass": emitted / passes if passes else 0.0,
            "prefill_pieces": pieces}


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| clients | requests | tokens | wall s | aggregate tok/s | x 1 client | mean TTFT s | "
             "TTFT x 1 client | max TTFT s | mean longest stall s | longest stall s | per-request tok/s | "
             "target passes | tok/pass | prefill pieces |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speedup = r["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"]
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.0f} | "
            f"{r['aggregate_tokens_per_s']:.3f} | {speedup:.2f} | "
            f"{r['mean_ttft_s']:.1f} | {r['mean_ttft_s'] / base['mean_ttft_s']:.2f} | "
            f"{r['max_ttft_s']:.1f} | {r.get('mean_max_stall_s', 0):.1f} | {r.get('max_stall_s', 0):.1f} | "
            f"{r['per_request_tokens_per_s']:.3f} | {r['target_passes']:.0f} | "
            f"{r['tokens_per_target_pass']:.2f} | {r.get('prefill_pieces', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_flags = DEFAULT_SERVER_FLAGS
    if "--" in argv:
        cut = argv.index("--")
        argv, server_flags = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels [default: 1,2,4,8]")
    parser.add_argument("--requests", type=int, default=8, help="requests per level [default: 8]")
    parser.add_argument("--conversations", action="store_true",
                        help="send each prompt's whole conversation (system prompt, earlier turns), as a "
                             "chat UI resends its history: long prompts")
    parser.add_argument("--stagger", type=float, default=0.0,
                        help="seconds between the clients' first requests [default: 0, all at once]")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", default=None, help="[id, text] JSON file [default: MT-Bench]")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--out", type=Path, default=None, help="rows as JSON")
    args = parser.parse_args(argv)
    import httpx

    levels = [int(c) for c in args.clients.split(",")]
    if args.conversations:
        prompts = [messages for _, messages in load_conversations(resolve_prompt_path(args.prompts),
                                                                  args.requests)]
    else:
        prompts = [text for _, text in load_prompt_set(resolve_prompt_path(args.prompts), args.requests)]
    process, url = start_server(server_flags, args.threads)
    try:
        one_request(httpx, url, prompts[0], 2)  # warm up
        rows = []
        for clients in levels:
            log(f"{clients} clients, {len(prompts)} requests of {args.max_tokens} tokens ...")
            rows.append(level(httpx, url, prompts, clients, args.max_tokens, args.stagger))
            log(json.dumps(rows[-1]))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    print(table(rows), end="")
    if args.out:
        args.out.write_text(json.dumps({"server_flags": server_flags, "max_tokens": args.max_tokens,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
