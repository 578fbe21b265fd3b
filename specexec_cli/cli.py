"""The `specexec` command line: click commands that parse flags and delegate to the library."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from specexec_cli import __version__
from specexec_cli.devices import MAX_THREADS, check_device
from specexec_cli.errors import SpecexecError, Terminated, UsageError
from specexec_cli.messages import one_line, unexpected
from specexec_cli.settings import BY_NAME, DEFAULT_TARGET, WEIGHT_FORMATS

EXIT_INTERRUPTED = 130
QUANTS = list(WEIGHT_FORMATS)
DEFAULT_SERVED_NAME = DEFAULT_TARGET  # served when no --target is given
PLANNED_NEW_TOKENS = 512  # what serve's memory plan holds per request when --max-tokens sets no cap
MAX_MEMORY_HELP = BY_NAME["max_memory"].help


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One-line errors on stderr with documented exit codes: 2 usage, 1 other errors, 130 Ctrl-C,
    143 SIGTERM. A closed stdout (`| head`) ends the command quietly. An unexpected exception is a
    bug: one line too, unless SPECEXEC_DEBUG=1 asks for the traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from specexec_cli.signals import EXIT_TERMINATED, sigterm_raises

        try:
            with sigterm_raises():
                return command(*args, **kwargs)
        except SpecexecError as exc:
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:
            if os.environ.get("SPECEXEC_DEBUG"):
                raise
            click.echo(f"error: {unexpected(exc)}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="specexec")
def main() -> None:
    """Run LLMs that do not fit in GPU memory, fast, with SpecExec speculative decoding."""


# --- generate ---------------------------------------------------------------------------------


def setting_option(setting: Any) -> Callable[..., Any]:
    """The click option of one engine setting (settings.SETTINGS)."""
    if isinstance(setting.kind, tuple):
        kind = click.Choice(list(setting.kind))
    else:
        kind = {int: int, float: float}.get(setting.kind, str)
    return click.option(*setting.flags, setting.name, type=kind, default=() if setting.multiple else None,
                        multiple=setting.multiple, help=setting.help)


def engine_options(*leave_out: str, profile: bool = True) -> Callable[..., Any]:
    """The engine flags (one per settings.SETTINGS entry, but `leave_out`), and --no-profile."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        from specexec_cli.settings import SETTINGS

        if profile:
            command = click.option("--no-profile", is_flag=True,
                                   help="Ignore tuned and starting profiles.")(command)
        for setting in reversed(SETTINGS):
            if setting.name not in leave_out:
                command = setting_option(setting)(command)
        return command

    return decorate


def engine_request(engine: dict[str, Any], batch_size: int | None) -> Any:
    """The EngineRequest of the engine flags (`engine_options`)."""
    from specexec_cli.settings import request_from_flags

    flags = dict(engine)
    use_profile = not flags.pop("no_profile", False)
    return request_from_flags(flags, batch_size=batch_size, use_profile=use_profile)


@main.command()
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt text (repeatable); '-' reads stdin.")
@click.option("-f", "--file", "files", multiple=True,
              help="Prompt file: plain text (one prompt) or JSON Lines with 'id' and 'prompt' (repeatable).")
@click.option("--input-format", type=click.Choice(["auto", "text", "jsonl"]), default="auto",
              show_default=True, help="How to read --file and stdin; auto detects JSON Lines.")
@engine_options()
@click.option("-n", "--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 decodes greedily.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables top-k.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", "stops", multiple=True, help="Stop string (repeatable); it is not printed.")
@click.option("--system", default=None, help="System message for the chat template.")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt on stdout (JSON Lines).")
@click.option("-v", "--verbose", is_flag=True, help="Per-prompt speed and pass counts on stderr.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Prompts decoded together, sharing each target pass; with a tree method the budget is "
              "shared by their trees [default: the profile's, else up to 8 when the target is offloaded "
              "(fewer if the memory plan cannot hold 8 prompts' KV caches), else 1].")
@click.option("--unordered", is_flag=True,
              help="Write each result when it finishes, not in input order (JSON Lines carry the id).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Append each result to FILE as one JSON line as soon as it finishes, synced to disk, so a "
              "killed job loses nothing finished; FILE is rewritten in input order when the job completes "
              "(unless --unordered). Prompt ids must be unique.")
@click.option("--resume", is_flag=True,
              help="Finish the job whose results are in -o FILE: prompts whose ids are there are skipped, a "
              "line torn by a kill is run again.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the prompts on a Ray cluster: ADDRESS as ray.init takes it (HOST:6379 of a `ray "
              "start --head` node, 'auto'), or 'local' to start one on this machine. Needs the [ray] extra.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None,
              help="Engines on the cluster (each opens the models once) [default: one per GPU, else one per "
              "node].")
@friendly_errors
def generate(prompts, files, input_format, max_new_tokens, temperature, top_p, top_k, seed, stops, system,
             no_chat_template, stream, as_json, verbose, batch_size, unordered, output, resume, ray_address,
             ray_workers, **engine) -> None:
    """Generate text; only the generated text (or JSON Lines with --json) goes to stdout.

    \b
    Examples:
      specexec generate -p "Write a Python function that reverses a list"
      echo "Explain KV caches" | specexec generate --stream
      specexec generate -f prompts.jsonl --json > results.jsonl
      specexec generate -f prompts.jsonl --json --offload disk --max-memory cpu=5GiB --batch-size 8
      specexec generate -f prompts.jsonl --json --ray HEAD_IP:6379 > results.jsonl
      specexec generate -f prompts.jsonl -o results.jsonl --resume    # rerun after a kill: finishes the rest
    """
    from specexec_cli.decoding.config import GenerationConfig, SamplingConfig
    from specexec_cli.prompts import collect_prompts

    sampling = SamplingConfig(temperature, top_p, top_k)
    GenerationConfig(max_new_tokens=max_new_tokens, sampling=sampling, stop_strings=tuple(stops),
                     seed=seed).validate()  # bad sampling or limits fail before anything loads
    if ray_workers is not None and ray_address is None:
        raise UsageError("--ray-workers needs --ray ADDRESS")
    batch = collect_prompts(prompts, files, sys.stdin, input_format)
    if resume and output is None:
        raise UsageError("--resume needs -o/--output FILE (the results of the job to finish)")
    if output is None:
        run_prompts(batch, max_new_tokens, sampling, stops, seed, system, no_chat_template, stream, as_json,
                    verbose, batch_size, unordered, ray_address, ray_workers, engine, sys.stdout)
        return
    from specexec_cli.results_file import ResultsFile, check_unique_ids

    if stream:
        raise UsageError("-o/--output writes whole results: drop --stream")
    check_unique_ids([prompt.id for prompt in batch])
    results = ResultsFile(output, resume)
    order = [prompt.id for prompt in batch]
    left = [prompt for prompt in batch if prompt.id not in results.done]
    if len(left) < len(batch):
        click.echo(f"resume: {len(batch) - len(left)} of {len(batch)} prompts already finished in {output}; "
                   f"running the other {len(left)}", err=True)
    try:
        if left:
            run_prompts(left, max_new_tokens, sampling, stops, seed, system, no_chat_template, False, True,
                        verbose, batch_size, True, ray_address, ray_workers, engine, results)
    finally:
        results.close(None if unordered else order)
    click.echo(f"{output}: {len(order)} results" + ("" if unordered else ", in input order"), err=True)


def run_prompts(batch: list[Any], max_new_tokens: int, sampling: Any, stops: tuple[str, ...],
                seed: int | None, system: str | None, no_chat_template: bool, stream: bool, as_json: bool,
                verbose: bool, batch_size: int | None, unordered: bool, ray_address: str | None,
                ray_workers: int | None, engine: dict[str, Any], out: Any) -> None:
    """Run `batch` on this machine or on Ray, writing each result to `out` (stdout or a results file)."""
    from specexec_cli.engine import Workload, open_engine
    from specexec_cli.run import run_batch

    if ray_address is not None:
        from specexec_cli.cluster.driver import plan_prompts
        from specexec_cli.cluster.worker import Job

        if stream:
            raise UsageError("--stream prints one prompt at a time on this machine; drop it with --ray")
        job = Job(engine_request(engine, batch_size), max_new_tokens, sampling, tuple(stops), seed, system,
                  not no_chat_template, plan_prompts(batch), len(batch))
        run_ray_job(ray_address, ray_workers, batch, job, as_json=as_json, verbose=verbose,
                    unordered=unordered, out=out)
        return
    if any(prompt.request is not None for prompt in batch):
        run_batch_api(batch, max_new_tokens, engine, batch_size, unordered, verbose, out)
        return
    streaming = stream and not as_json
    workload = Workload.of_prompts(batch, max_new_tokens, system, not no_chat_template, streaming)
    engine = open_engine(engine_request(engine, batch_size), workload)
    config = engine.config(max_new_tokens, sampling, tuple(stops), seed)
    if engine.lanes > 1:
        click.echo(f"batch: {len(batch)} prompts, up to {engine.lanes} per target pass", err=True)
    run_batch(engine.pair, batch, config, system=system, chat_template=not no_chat_template, as_json=as_json,
              stream=stream, verbose=verbose, out=out, batch_size=engine.lanes, unordered=unordered)


def run_ray_job(address: str, workers: int | None, batch: list[Any], job: Any, *, as_json: bool,
                verbose: bool, unordered: bool, out: Any) -> None:
    """`generate --ray`: the prompts run on a Ray cluster, one engine per worker; exit 1 if any failed."""
    from specexec_cli.cluster.driver import run_on_ray

    if any(prompt.request is not None for prompt in batch):
        raise UsageError("--ray runs prompt and chat lines; run OpenAI Batch API lines without --ray")
    summary = run_on_ray(address, job, batch, workers=workers, as_json=as_json, verbose=verbose,
                         out=out, unordered=unordered)
    if summary.failed:
        named = ", ".join(summary.failed[:10]) + (" ..." if len(summary.failed) > 10 else "")
        raise SpecexecError(f"{len(summary.failed)} of {len(batch)} prompts failed ({named}); the others "
                            "were written")


def run_batch_api(batch: list[Any], max_new_tokens: int, engine: dict[str, Any], batch_size: int | None,
                  unordered: bool, verbose: bool, out: Any) -> None:
    """`generate -f` of OpenAI Batch API lines: each line's body sets its own sampling and limits (-n is
    the default max_tokens); the Batch API's output lines go to stdout; exit 1 if any request failed."""
    from specexec_cli.engine import Workload, open_engine
    from specexec_cli.serve.batch_api import batch_jobs, run_requests
    from specexec_cli.serve.protocol import ApiError, encode_job

    if not all(prompt.request is not None for prompt in batch):
        raise UsageError("OpenAI Batch API lines cannot be mixed with other prompts in one run")
    jobs = batch_jobs(batch, max_new_tokens)
    valid = [(prompt, job) for prompt, job in zip(batch, jobs, strict=True) if not isinstance(job, ApiError)]

    def length(tokenizer: Any, job: Any) -> int:
        try:
            return len(encode_job(tokenizer, job))
        except ApiError:  # run_requests answers this request with its error
            return 0

    def lengths(tokenizer: Any) -> list[int]:
        return [length(tokenizer, job) for _, job in valid]

    most_tokens = max([job.max_tokens for _, job in valid] or [max_new_tokens])
    workload = Workload(lengths, most_tokens, max(1, len(valid)))
    opened = open_engine(engine_request(engine, batch_size), workload)
    if opened.lanes > 1:
        click.echo(f"batch: {len(batch)} requests, up to {opened.lanes} per target pass", err=True)
    model = engine["target"] or DEFAULT_SERVED_NAME
    failed = run_requests(opened, batch, jobs, model=model, out=out, batch_size=opened.lanes,
                          unordered=unordered, verbose=verbose)
    if failed:
        raise SpecexecError(f"{failed} of {len(batch)} requests failed; their output lines carry the error")

# --- serve ------------------------------------------------------------------------------------


@main.command()
@engine_options()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="SPECEXEC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1 routes "
              "[env: SPECEXEC_API_KEY; default: none].")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded at once, sharing every target pass; more wait.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a lane; past it the answer is 503 with Retry-After.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="A cap on a request's new tokens [default: none: as many as the model's context leaves "
              "after the prompt, as vLLM; a request naming none gets that many].")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Longest prompt in tokens (a longer one is a 400); the memory plan holds --max-batch of "
              "them with their new tokens.")
@click.option("--served-model-name", default=None,
              help="The model id clients name and /v1/models lists [default: the target's name].")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, seconds to finish the requests in flight before cancelling them.")
@click.option("--allowed-origins", default=None,
              help="Comma-separated browser origins allowed by CORS ('*': any) [default: none].")
@friendly_errors
def serve(host, port, api_key, max_batch, max_queue, max_tokens, max_prompt_tokens, served_model_name,
          shutdown_timeout, allowed_origins, **engine) -> None:
    """Serve the OpenAI API (chat and text completions, streamed or not) on HTTP.

    Concurrent requests are lanes of one batch: each target pass checks every active request's tree.
    SIGTERM or SIGINT stops admitting (503), finishes what is in flight within --shutdown-timeout,
    cancels the rest and exits 0.

    \b
    Examples:
      specexec serve                                   # the bundled pair on http://127.0.0.1:8000/v1
      specexec serve -t llama-3-70b --max-batch 4 --api-key "$KEY"
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
    """
    from specexec_cli.engine import Workload, open_engine
    from specexec_cli.serve.app import ServeOptions, bind
    from specexec_cli.serve.app import serve as run_server

    if engine["method"] == "specinfer":
        raise UsageError("serve runs specexec or autoregressive decoding; specinfer is a baseline for bench")
    sock = bind(host, port)  # a taken port fails before the models load
    # the memory plan holds --max-batch prompts of --max-prompt-tokens, each with --max-tokens new ones
    # (PLANNED_NEW_TOKENS without a cap: a longer answer grows its cache past the plan)
    workload = Workload.uniform(max_prompt_tokens, max_tokens or PLANNED_NEW_TOKENS, max_batch)
    opened = open_engine(engine_request(engine, max_batch), workload)
    options = ServeOptions(host=host, port=port, api_key=api_key or None, max_batch=max_batch,
                           max_queue=max_queue, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                           model_name=served_model_name or engine["target"] or DEFAULT_SERVED_NAME,
                           shutdown_timeout=shutdown_timeout,
                           allowed_origins=csv_strings(allowed_origins))
    run_server(opened, options, sock)

# --- models -----------------------------------------------------------------------------------


def format_params(count: int | None) -> str:
    if not count:
        return "-"
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model on stdout.")
@click.option("--local", is_flag=True, help="Only models whose weights are on this machine.")
@friendly_errors
def models(as_json: bool, local: bool) -> None:
    """List known targets and drafts; `*` marks weights available on this machine."""
    import json

    from specexec_cli.models.registry import list_models

    rows = [row for row in list_models() if row["available_locally"] or not local]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(f"  {'name':<22} {'role':<7} {'params':>7}  {'drafts / source'}")
    for row in rows:
        mark = "*" if row["available_locally"] else " "
        extra = ", ".join(row["drafts"]) if row["drafts"] else (row["hub_id"] or row["source"])
        size = format_params(row["params"])
        click.echo(f"{mark} {row['name']:<22} {row['role'] or '':<7} {size:>7}  {extra}")

# --- probe / tune / profiles ------------------------------------------------------------------


def csv_strings(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def csv_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="The probe as JSON on stdout.")
@click.option("--refresh", is_flag=True, help="Measure again instead of using the cached probe.")
@friendly_errors
def probe(as_json: bool, refresh: bool) -> None:
    """Probe GPUs (NVML), RAM, disk and measured bandwidths; a table on stderr, or --json on stdout."""
    import json

    from specexec_cli import hardware

    result = hardware.cached_probe(refresh=refresh)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(hardware.format_probe(result), err=True)


@main.command()
@click.option("-t", "--target", required=True, help="Target model (registry name, hub id or folder).")
@click.option("-d", "--draft", "drafts", multiple=True,
              help="Draft candidates (repeatable; 'none' and 'first-layers:N' allowed) [default: registry].")
@click.option("--quant", "quants", multiple=True,
              help="Target formats to try (fp32, fp16, bf16, gptq, awq, w4a16, nf4, int8).")
@click.option("--early-exit", default=None, help="Comma-separated layer counts for early-exit drafts.")
@click.option("--budgets", default=None, help="Comma-separated budgets to search [default: 1,2,4,...,4096].")
@click.option("--trials", type=int, default=24, show_default=True, help="Most trials to measure.")
@click.option("--patience", type=int, default=8, show_default=True,
              help="Stop once this many trials in a row measured nothing faster (0: measure --trials).")
@click.option("--timeout", type=float, default=None, help="Seconds for the whole search.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="Calibration prompts: JSON list, JSON Lines or text "
              "[default: packaged MT-Bench/OASST prompts].")
@click.option("--n-prompts", type=int, default=4, show_default=True,
              help="Calibration prompts each trial generates from.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--study", default=None, help="Study name; the same name resumes an interrupted search.")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--max-memory", multiple=True, help=MAX_MEMORY_HELP)
@click.option("--offload", type=click.Choice(["auto", "none", "ram", "disk"]), default=None,
              help="Offload tiers the target is placed in (auto: every tier the planner allows under "
              "--max-memory) [default: auto with --max-memory, else the loader's own placement].")
@click.option("--calibration-iterations", type=int, default=4, show_default=True,
              help="SpecExec iterations (trees) per prompt for the acceptance curve.")
@click.option("--step-seconds", type=float, default=30.0, show_default=True,
              help="Each calibration measurement stops after this long with what it measured.")
@click.option("--trial-seconds", type=float, default=30.0, show_default=True,
              help="Each trial's measurement stops after this long (tokens/s over what it generated).")
@click.option("--batch-prompts", type=click.Path(dir_okay=False), default=None,
              help="A batch workload, read like generate's -f (plain text or JSON Lines): after the search, "
              "the best configuration is measured at each --batch-sizes on these prompts and the fastest "
              "size is saved as the profile's batch size; offloaded targets are planned for its caches.")
@click.option("--batch-sizes", default="1,2,4,8,16", show_default=True,
              help="Comma-separated batch sizes to measure (capped by the number of batch prompts).")
@click.option("--batch-new-tokens", type=click.IntRange(min=1), default=None,
              help="New tokens per prompt in the batch measurement [default: --max-new-tokens].")
@click.option("--no-save", is_flag=True, help="Do not write a profile.")
@friendly_errors
def tune(target, drafts, quants, early_exit, budgets, trials, patience, timeout, prompts_file, n_prompts,
         max_new_tokens, study, device, max_memory, offload, calibration_iterations, step_seconds,
         trial_seconds, batch_prompts,
         batch_sizes, batch_new_tokens, no_save) -> None:
    """Search draft, quantization and tree budget for the most tokens/s here; save a profile.

    \b
    With --batch-prompts FILE, also pick the batch size (prompts per target pass) for that workload:
      specexec tune -t qwen2.5-coder-1.5b --max-memory cpu=5GiB --batch-prompts prompts.jsonl
    """
    from pathlib import Path

    from specexec_cli.tuning.options import TuneOptions
    from specexec_cli.tuning.tune import tune as run_tune

    options = TuneOptions(target=target, drafts=tuple(drafts) or None, quantizations=tuple(quants) or None,
                          early_exit_layers=csv_ints(early_exit, "--early-exit"), n_trials=trials,
                          patience=patience or None,
                          timeout=timeout, prompts_file=Path(prompts_file) if prompts_file else None,
                          n_prompts=n_prompts, max_new_tokens=max_new_tokens, study=study,
                          device=check_device(device), save=not no_save, max_memory=tuple(max_memory),
                          offload=offload, calibration_iterations=calibration_iterations,
                          calibration_step_s=step_seconds, trial_time_limit_s=trial_seconds,
                          batch_prompts_file=Path(batch_prompts) if batch_prompts else None,
                          batch_sizes=csv_ints(batch_sizes, "--batch-sizes") or (),
                          batch_new_tokens=batch_new_tokens)
    parsed_budgets = csv_ints(budgets, "--budgets")
    if parsed_budgets:
        options = TuneOptions(**{**options.__dict__, "budgets": parsed_budgets})
    report = run_tune(options)
    click.echo(report.summary(), err=True)


@main.group()
def profiles() -> None:
    """List, show or remove tuned profiles."""


@profiles.command("list")
@friendly_errors
def profiles_list() -> None:
    """Tuned profiles in the user config folder."""
    from specexec_cli import hardware
    from specexec_cli import profiles as store

    click.echo(store.format_profile_list(store.list_profiles(), hardware.fingerprint()))


@profiles.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def profiles_show(ref: str, as_json: bool) -> None:
    """Show a profile by file name, path or target name."""
    from specexec_cli import hardware
    from specexec_cli import profiles as store

    path = store.resolve_profile(ref, fingerprint=hardware.fingerprint())
    profile = store.load_profile(path)
    click.echo(store.profile_json(profile) if as_json else store.format_profile(profile, path))


@profiles.command("rm")
@click.argument("ref")
@friendly_errors
def profiles_rm(ref: str) -> None:
    """Remove a profile by file name, path or target name."""
    from specexec_cli import hardware
    from specexec_cli import profiles as store

    path = store.remove_profile(ref, fingerprint=hardware.fingerprint())
    click.echo(f"removed {path}", err=True)


# --- bench ------------------------------------------------------------------------------------


@main.command()
@click.option("--prompts", default=None,
              help="Prompt set: mtbench, oasst (both shipped) or a [id, text] JSON file [default: mtbench].")
@click.option("--n-prompts", type=int, default=8, show_default=True)
@click.option("-n", "--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", "temperatures", type=float, multiple=True,
              help="Repeatable [default: 0 and 0.6].")
@click.option("--budgets", default=None, help="SpecExec budgets [default: 1,16,64,256,1024].")
@click.option("--specinfer-budgets", default=None, help="SpecInfer budgets [default: 16,64,256].")
@click.option("--methods", default="specexec,specinfer,autoregressive,assisted", show_default=True)
@click.option("--no-assisted", is_flag=True, help="Skip transformers' assisted generation.")
@engine_options("method", "budget", "prefill_chunk", profile=False)
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="torch CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Rows as JSON Lines instead of tables.")
@friendly_errors
def bench(prompts, n_prompts, max_new_tokens, temperatures, budgets, specinfer_budgets, methods, no_assisted,
          threads, seed, as_json, **engine) -> None:
    """Measure SpecExec, SpecInfer, plain and assisted decoding in one process; tables on stdout.

    The pair opens through the same engine as generate (the engine flags are generate's; no profile).
    With an offloaded target every row also says its speedup over plain decoding at equal memory.

    \b
    The streamed regime (the target read from disk for every pass, memory capped):
      specexec bench --offload disk --max-memory cpu=5GiB --no-assisted
    """
    from specexec_cli import bench as benchmark

    request = engine_request({**engine, "no_profile": True}, None)
    benchmark.run_benchmark(request, prompts=prompts, n_prompts=n_prompts, max_new_tokens=max_new_tokens,
                            temperatures=temperatures or (0.0, 0.6),
                            budgets=benchmark.parse_budgets(budgets) if budgets else None,
                            specinfer_budgets=benchmark.parse_budgets(specinfer_budgets) if specinfer_budgets
                            else None,
                            methods=benchmark.parse_methods(methods), assisted=not no_assisted,
                            threads=threads, seed=seed, json_lines=as_json)
