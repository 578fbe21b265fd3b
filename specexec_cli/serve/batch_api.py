"""OpenAI Batch API lines offline (`generate -f` of {"custom_id", "method", "url", "body"} lines, as
`vllm run-batch` takes them): each line is parsed and checked by the server's own request path
(serve/protocol.py), run as the server would answer it, several sharing each target pass, and written
in the Batch API's output format."""

from __future__ import annotations

import json
from typing import Any, TextIO

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import GenerationResult
from specexec_cli.decoding.runner import generate_many
from specexec_cli.engine import log
from specexec_cli.prompts import Prompt
from specexec_cli.run import OrderedWriter, describe
from specexec_cli.serve import protocol
from specexec_cli.serve.protocol import ApiError, Limits, batch_kind, parse_job


def batch_jobs(prompts: list[Prompt], default_tokens: int) -> list[Any]:
    """Each Batch API line's Job, or the ApiError its request would get from `specexec serve` (offline
    requests have no server caps: the model's context is the bound; `default_tokens`, generate's -n, is
    the limit of a request naming none)."""
    jobs: list[Any] = []
    for prompt in prompts:
        try:
            kind = batch_kind(prompt.request)
            jobs.append(parse_job(prompt.request["body"], kind, Limits(None, None, default_tokens)))
        except ApiError as error:
            jobs.append(error)
    return jobs


def run_requests(engine: Any, prompts: list[Prompt], jobs: list[Any], *, model: str, out: TextIO,
                 batch_size: int = 1, unordered: bool = False, verbose: bool = False) -> int:
    """Run Batch API lines as `specexec serve` would answer them, several sharing each target pass, and
    write the Batch API's output lines (`{"id", "custom_id", "response": {"status_code", "body"},
    "error"}`), in input order unless `unordered`. A request that fails is an output line with its 4xx
    error body, as the server would answer it; the others run; a completions request of several
    prompts is one line with a choice per prompt. Returns the number that failed."""
    pair = engine.pair
    writer = OrderedWriter(out, unordered)
    context = getattr(pair.target.config, "max_position_embeddings", None)
    runnable: list[tuple[int, int, torch.Tensor, GenerationConfig, Any]] = []  # (line, choice, ids, ...)
    choices: dict[int, dict[int, tuple[str, str, tuple[dict, dict]]]] = {}  # line -> choice -> answer
    failed = 0

    def write(index: int, status: int, body: dict[str, Any]) -> None:
        record = protocol.batch_output(prompts[index].id, status, body)
        writer.put(index, json.dumps(record, ensure_ascii=False) + "\n")

    for index, (prompt, job) in enumerate(zip(prompts, jobs, strict=True)):
        try:
            if isinstance(job, ApiError):
                raise job
            protocol.check_text_length(pair.tokenizer, job, None, context)
            lanes = []
            for choice in range(len(job.prompts) if job.kind == "completion" else 1):
                ids = protocol.encode_job(pair.tokenizer, job, choice)
                protocol.check_prompt_length(len(ids))
                settled = protocol.with_max_tokens(job, len(ids), context)
                lanes.append((index, choice, torch.tensor(ids), protocol.job_config(engine, settled), job))
        except ApiError as error:
            failed += 1
            log(f"[{prompt.id}] error {error.status}: {error.message}")
            write(index, error.status, error.body())
            continue
        runnable += lanes
        choices[index] = {}

    def on_result(position: int, result: GenerationResult) -> None:
        index, choice, ids, _, job = runnable[position]
        choices[index][choice] = (result.text or "", result.finish_reason,
                                  protocol.result_figures(result, ids.numel()))
        if verbose:
            log(describe(prompts[index], result))
        wanted = len(job.prompts) if job.kind == "completion" else 1
        if len(choices[index]) == wanted:
            done = choices.pop(index)
            usage, timings = protocol.merged_figures([done[c][2] for c in sorted(done)])
            answers = [(c, done[c][0], done[c][1]) for c in sorted(done)]
            body = protocol.completion_body(job, protocol.new_id(job.kind), model, answers, usage, timings)
            write(index, 200, body)

    try:
        if runnable:
            generate_many(pair.target, pair.draft, (ids for _, _, ids, _, _ in runnable), runnable[0][3],
                          on_result, batch_size=batch_size,
                          decode=lambda t: pair.tokenizer.decode(t, skip_special_tokens=True),
                          config_of=lambda position: runnable[position][3])
    finally:
        writer.close(prompts)
    return failed
