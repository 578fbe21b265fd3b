"""Run a batch of prompts through an opened engine (specexec_cli.engine) and write each result.

Each finished prompt's result is written and flushed as soon as it and every earlier prompt are done,
and whatever finished is written when a failure or Ctrl-C stops the run, so nothing done is lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, TextIO

import torch

from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import GenerationResult
from specexec_cli.decoding.runner import generate_many
from specexec_cli.engine import ModelPair, log
from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.prompts import Prompt, encode


def result_record(prompt: Prompt, result: GenerationResult, config: GenerationConfig) -> dict[str, Any]:
    """The JSON Lines object written for one prompt."""
    return {
        "id": prompt.id,
        "text": result.text,
        "new_tokens": result.n_new_tokens,
        "finish_reason": result.finish_reason,
        "tokens_per_s": round(result.tokens_per_s, 3),
        "tokens_per_target_pass": round(result.tokens_per_pass, 3),
        "target_passes": result.n_target_passes,
        "draft_passes": result.stats.draft_passes,
        "elapsed_s": round(result.elapsed_s, 3),
        "method": config.method,
        "budget": config.tree.budget if config.method != "autoregressive" else None,
    }


def describe(prompt: Prompt, result: GenerationResult) -> str:
    """One line of stats for --verbose."""
    share = result.host_s / result.elapsed_s if result.elapsed_s else 0.0
    return (f"[{prompt.id}] {result.n_new_tokens} tokens in {result.elapsed_s:.2f} s "
            f"({result.tokens_per_s:.2f} tok/s), {result.tokens_per_pass:.2f} tokens/target pass, "
            f"{result.n_target_passes} target + {result.stats.draft_passes} draft passes, "
            f"host {share:.0%}, finish: {result.finish_reason}")


class OrderedWriter:
    """Writes each prompt's output line as soon as it and every earlier prompt are done (or at once,
    `unordered`). `close` writes what is still held back when the run stops early, so no finished result
    is lost, and says which prompts did not finish."""

    def __init__(self, out: TextIO, unordered: bool) -> None:
        self.out, self.unordered = out, unordered
        self.held: dict[int, str | None] = {}
        self.next_index = 0
        self.written = 0

    def put(self, index: int, text: str | None) -> None:
        """Prompt `index`'s output; None: it has none (it failed), so later ones need not wait for it."""
        if self.unordered:
            self._write(text)
            return
        self.held[index] = text
        while self.next_index in self.held:
            self._write(self.held.pop(self.next_index))
            self.next_index += 1

    def close(self, prompts: list[Prompt]) -> None:
        if self.held:
            missing = [prompts[i].id for i in range(self.next_index, max(self.held)) if i not in self.held]
            named = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            log(f"warning: the run stopped before prompt(s) {named} finished; the "
                f"{len(self.held)} later result(s) that did finish follow without them")
            for index in sorted(self.held):
                self._write(self.held.pop(index))

    def _write(self, text: str | None) -> None:
        if text is None:  # a prompt with no output
            return
        self.out.write(text)
        self.out.flush()
        self.written += 1


def encode_prompt(pair: ModelPair, prompt: Prompt, config: GenerationConfig, system: str | None,
                  chat_template: bool) -> torch.Tensor:
    """A prompt's token ids [L], checked: not empty, and room in the model's context for its new tokens."""
    limit = getattr(pair.target.config, "max_position_embeddings", None)
    ids = encode(pair.tokenizer, prompt, system, chat_template)
    if not ids:
        raise UsageError(f"prompt {prompt.id} encodes to no tokens")
    # a tree is never deeper than the tokens still wanted (decoding/growth.py): no position reaches
    # prompt + max_new_tokens
    if limit and len(ids) + config.max_new_tokens > limit:
        raise SpecexecError(f"prompt {prompt.id} has {len(ids)} tokens; with --max-new-tokens "
                            f"{config.max_new_tokens} it exceeds the model's context of {limit}")
    return torch.tensor(ids)


def encoded_prompts(pair: ModelPair, prompts: list[Prompt], config: GenerationConfig, system: str | None,
                    chat_template: bool) -> Iterator[torch.Tensor]:
    """Each prompt's token ids [L], checked when it is reached (a bad one raises then)."""
    for prompt in prompts:
        yield encode_prompt(pair, prompt, config, system, chat_template)


def run_batch(pair: ModelPair, prompts: list[Prompt], config: GenerationConfig, *, system: str | None,
              chat_template: bool, as_json: bool, stream: bool, verbose: bool, out: TextIO,
              batch_size: int = 1, unordered: bool = False) -> int:
    """Generate for every prompt, `batch_size` at a time sharing each target pass; write each result
    as soon as it and all earlier ones are done (any order if `unordered`). Returns the count written.

    On an error or Ctrl-C, every finished result is written before the exception goes on."""
    writer = OrderedWriter(out, unordered)
    streaming = stream and not as_json

    def write_piece(piece: str) -> None:
        out.write(piece)
        out.flush()

    def on_result(index: int, result: GenerationResult) -> None:
        if as_json:
            writer.put(index, json.dumps(result_record(prompts[index], result, config), ensure_ascii=False)
                       + "\n")
        else:
            writer.put(index, "\n" if streaming else result.text + "\n")
        if verbose:
            log(describe(prompts[index], result))

    try:
        generate_many(pair.target, pair.draft, encoded_prompts(pair, prompts, config, system, chat_template),
                      config, on_result, batch_size=1 if streaming else batch_size,
                      decode=lambda t: pair.tokenizer.decode(t, skip_special_tokens=True),
                      on_text=write_piece if streaming else None)
    finally:
        writer.close(prompts)
    return writer.written
