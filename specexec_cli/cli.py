"""The `specexec` command line: click commands that parse flags and delegate to the library."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from specexec_cli import __version__
from specexec_cli.errors import SpecexecError

EXIT_INTERRUPTED = 130


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """One-line errors on stderr with documented exit codes: 2 usage, 1 other errors, 130 Ctrl-C.
    A closed stdout (`| head`) ends the command quietly."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecexecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="specexec")
def main() -> None:
    """Run LLMs that do not fit in GPU memory, fast, with SpecExec speculative decoding."""


# --- generate ---------------------------------------------------------------------------------


@main.command()
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt text (repeatable); '-' reads stdin.")
@click.option("-f", "--file", "files", multiple=True,
              help="Prompt file: plain text (one prompt) or JSON Lines with 'id' and 'prompt' (repeatable).")
@click.option("--input-format", type=click.Choice(["auto", "text", "jsonl"]), default="auto",
              show_default=True, help="How to read --file and stdin; auto detects JSON Lines.")
@click.option("-t", "--target", default=None, help="Target model: registry name, hub id, folder or .gguf "
              "[default: qwen2.5-coder-1.5b, the bundled pair].")
@click.option("-d", "--draft", default=None,
              help="Draft model name or path, 'first-layers:N' (the target's first N layers) or 'none'.")
@click.option("-m", "--method", type=click.Choice(["specexec", "specinfer", "autoregressive"]),
              default="specexec", show_default=True)
@click.option("--budget", type=int, default=None, help="Tree tokens checked per target pass [default: 64].")
@click.option("--max-n-beams", type=int, default=None, help="Nodes the draft expands per pass [default: 16].")
@click.option("--max-beam-len", type=int, default=None, help="Draft passes per iteration [default: 8].")
@click.option("--max-branch-width", type=int, default=None, help="Children per expanded node [default: 8].")
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
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="[default: fp32 on CPU, bf16/fp16 on GPU].")
@click.option("--offload", type=click.Choice(["none", "ram", "disk", "auto"]), default=None,
              help="Stream the target's layers from host RAM or disk; auto picks the first tier that fits "
              "[default: keep the target resident, unless another offload flag is given].")
@click.option("--quant", type=click.Choice(["fp16", "bf16", "fp32", "gptq", "nf4", "int8"]), default=None,
              help="Target weight format when offloading (gptq loads the registry's GPTQ checkpoint).")
@click.option("--buffers", type=int, default=None, help="Device-side layer buffers in the ring (>= 2).")
@click.option("--resident-layers", type=int, default=None,
              help="First layers kept on the device [default: as many as fit].")
@click.option("--offload-dir", default=None, help="Where the disk tier writes converted layers.")
@friendly_errors
def generate(prompts, files, input_format, target, draft, method, budget, max_n_beams, max_beam_len,
             max_branch_width, max_new_tokens, temperature, top_p, top_k, seed, stops, system,
             no_chat_template, stream, as_json, verbose, device, dtype, offload, quant, buffers,
             resident_layers, offload_dir) -> None:
    """Generate text; only the generated text (or JSON Lines with --json) goes to stdout.

    \b
    Examples:
      specexec generate -p "Write a Python function that reverses a list"
      echo "Explain KV caches" | specexec generate --stream
      specexec generate -f prompts.jsonl --json > results.jsonl
    """
    from specexec_cli.decoding.config import GenerationConfig, SamplingConfig, TreeConfig
    from specexec_cli.prompts import collect_prompts
    from specexec_cli.run import (
        DEFAULT_TARGET,
        OffloadOptions,
        default_device,
        load_pair,
        offloaded_loader,
        parse_dtype,
        run_batch,
    )

    tree = TreeConfig(budget=64 if budget is None else budget,
                      max_n_beams=16 if max_n_beams is None else max_n_beams,
                      max_beam_len=8 if max_beam_len is None else max_beam_len,
                      max_branch_width=8 if max_branch_width is None else max_branch_width)
    config = GenerationConfig(method=method, max_new_tokens=max_new_tokens,
                              sampling=SamplingConfig(temperature, top_p, top_k), tree=tree,
                              stop_strings=tuple(stops), seed=seed)
    config.validate()
    batch = collect_prompts(prompts, files, sys.stdin, input_format)
    device = device or default_device()
    load_target = None
    if any(flag is not None for flag in (offload, quant, buffers, resident_layers, offload_dir)):
        options = OffloadOptions(offload or "auto", quant, 2 if buffers is None else buffers, resident_layers,
                                 offload_dir)
        load_target = offloaded_loader(options, budget, max_new_tokens + 2048)
    pair = load_pair(target or DEFAULT_TARGET, draft, method, device, parse_dtype(dtype, device), load_target)
    config = GenerationConfig(**{**config.__dict__, "eos_token_ids": pair.eos_token_ids})
    run_batch(pair, batch, config, system=system, chat_template=not no_chat_template, as_json=as_json,
              stream=stream, verbose=verbose, out=sys.stdout)

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

# --- offload / runtime ------------------------------------------------------------------------

# --- probe / tune / profiles ------------------------------------------------------------------

# --- bench ------------------------------------------------------------------------------------
