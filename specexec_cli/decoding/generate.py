"""The generation loop: run a decoder until EOS, a stop string or max_new_tokens, and report stats.

`generate` is the one entry point the CLI, the benchmark and the tuner call. Tokens are committed one
at a time from each iteration's output, so EOS and the token limit are honoured exactly (a speculative
iteration may produce more tokens than are needed; the extra ones are dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specexec_cli.decoding.autoregressive import AutoregressiveDecoder
from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.specexec import SpecExecDecoder
from specexec_cli.decoding.specinfer import SpecInferDecoder
from specexec_cli.decoding.stats import PassStats
from specexec_cli.errors import UsageError


@dataclass
class GenerationResult:
    """What one prompt produced, and what it cost."""

    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    elapsed_s: float
    stats: PassStats = field(default_factory=PassStats)

    @property
    def n_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.n_new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def n_target_passes(self) -> int:
        return self.stats.target_passes

    @property
    def tokens_per_pass(self) -> float:
        return self.n_new_tokens / max(1, self.stats.target_passes)

    @property
    def host_s(self) -> float:
        """Time outside model forwards: tree bookkeeping, validation, sampling, cache compaction."""
        return max(0.0, self.elapsed_s - self.stats.target_s - self.stats.draft_s)


def make_decoder(target: torch.nn.Module, draft: torch.nn.Module | None, config: GenerationConfig,
                 generator: torch.Generator | None):
    """The decoder object for config.method (each has `.step(sequence) -> list[int]` and `.stats`)."""
    if config.method == "autoregressive":
        return AutoregressiveDecoder(target, config, generator)
    if draft is None:
        raise UsageError(f"method {config.method!r} needs a draft model")
    if config.method == "specexec":
        return SpecExecDecoder(target, draft, config, generator)
    return SpecInferDecoder(target, draft, config, generator)


class StopStringWatcher:
    """Decodes the output as it grows, finds the first stop string and releases text safe to stream.

    Text that could still be the start of a stop string, or an incomplete UTF-8 sequence, is held back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]) -> None:
        self.decode, self.stop_strings = decode, stop_strings
        self.released = 0  # characters of the text already handed out
        self.text = ""

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """New text safe to show, and whether a stop string was found (then the text ends before it)."""
        self.text = self.decode(token_ids)
        cut = min((i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._release(len(self.text)), True
        safe = len(self.text)
        while safe > self.released and self.text[safe - 1] == "\ufffd":
            safe -= 1
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if self.text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        return self._release(max(safe, self.released)), False

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.released : upto]
        self.released = upto
        return piece


def generate(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    input_ids: torch.Tensor,  # [1, L] or [L]
    config: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate from one prompt. `decode` turns token ids into text (needed for stop strings and
    streaming); `on_text` receives each newly final piece of text as it is produced."""
    config.validate()
    if (config.stop_strings or on_text) and decode is None:
        raise ValueError("stop strings and streaming need a decode function")
    device = target.device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(config.seed)
    decoder = make_decoder(target, draft, config, generator)
    sequence = input_ids.reshape(-1).to(device)
    prompt_len = sequence.numel()
    if prompt_len == 0:
        raise UsageError("the prompt is empty")
    watcher = StopStringWatcher(decode, config.stop_strings) if decode is not None else None
    eos = set(config.eos_token_ids)
    new_tokens: list[int] = []
    finish_reason, stopped_by_string = "length", False
    start = time.perf_counter()
    while finish_reason == "length" and len(new_tokens) < config.max_new_tokens:
        emitted = decoder.step(sequence)
        for token in emitted:
            new_tokens.append(token)
            if token in eos:
                finish_reason = "stop"
                break
            if len(new_tokens) >= config.max_new_tokens:
                break
        fresh = torch.tensor(new_tokens[sequence.numel() - prompt_len :], dtype=sequence.dtype, device=device)
        sequence = torch.cat([sequence, fresh])
        if watcher is not None and (config.stop_strings or on_text):
            piece, stopped_by_string = watcher.update(new_tokens)
            if stopped_by_string:
                finish_reason = "stop"
            if on_text and piece:
                on_text(piece)
    elapsed = time.perf_counter() - start
    text = None
    if watcher is not None:
        if not stopped_by_string:
            watcher.text = decode(new_tokens)
        tail = watcher.finish()
        if on_text and tail:
            on_text(tail)
        text = watcher.text
    return GenerationResult(new_tokens, text, finish_reason, elapsed, decoder.stats)
