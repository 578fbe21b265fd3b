"""The generation loop: run a decoder until EOS, a stop string or max_new_tokens, and report stats.

`generate` decodes one prompt; `runner.generate_many` decodes a stream of prompts, several at a time sharing
each target pass. Tokens are committed one at a time from each iteration's output, so EOS and the token
limit are honoured exactly (a speculative iteration may produce more tokens than are needed; the extra
ones are dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specexec_cli.decoding.autoregressive import AutoregressiveDecoder
from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.lanes import Lane, LaneDecoder, Piece
from specexec_cli.decoding.prefill import chunk_budget, plan_pieces
from specexec_cli.decoding.sampling import TokenDraws
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
                 max_lanes: int = 1) -> LaneDecoder:
    """The decoder for config.method; `max_lanes`: the most prompts that will share a pass."""
    if config.method == "autoregressive":
        return AutoregressiveDecoder(target, config)
    if draft is None:
        raise UsageError(f"method {config.method!r} needs a draft model")
    if config.method == "specexec":
        return SpecExecDecoder(target, draft, config)
    return SpecInferDecoder(target, draft, config, max_lanes)


class StopStringWatcher:
    """Decodes the output as it grows, finds the first stop string and releases text safe to stream.

    Decoding is incremental: each update decodes only the tokens since the last stable point plus the few
    before them (so a tokenizer's merges and leading spaces come out as in a whole decode), and only the
    new text is searched for stop strings, so the work per iteration does not grow with the output.
    Text that could still be the start of a stop string, or an incomplete UTF-8 sequence, is held back.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]) -> None:
        self.decode, self.stop_strings = decode, stop_strings
        self.released = 0  # characters of the text already handed out
        self.text = ""
        self.prefix_offset = self.read_offset = 0  # tokens: context start, end of the decoded ones
        self.searched = 0  # characters of the text already searched for stop strings
        self.longest_stop = max((len(stop) for stop in stop_strings), default=0)

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """New text safe to show, and whether a stop string was found (then the text ends before it)."""
        new_text = self.decode(token_ids[self.prefix_offset:])
        prefix_text = self.decode(token_ids[self.prefix_offset:self.read_offset])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        start = max(0, self.searched - self.longest_stop + 1)
        cut = min((i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0), default=-1)
        self.searched = len(self.text)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._release(len(self.text)), True
        safe = len(self.text)
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


def tokens_of_text(decode: Callable[[list[int]], str], token_ids: list[int], n_chars: int) -> int:
    """The fewest leading tokens whose text holds the first `n_chars` characters: what a reply cut at a
    stop string returned (searched from the end: the cut is in the last iteration's few tokens)."""
    k = len(token_ids)
    while k > 0 and len(decode(token_ids[: k - 1])) >= n_chars:
        k -= 1
    return k


class Run:
    """One prompt in flight: its lane, what it has produced so far and when it finishes. `config` is this
    prompt's own: its sampling, seed, token limit, stop strings and EOS ids (the tree is the decoder's)."""

    def __init__(self, key: int, ids: torch.Tensor, config: GenerationConfig,
                 decode: Callable[[list[int]], str] | None, on_text: Callable[[str], None] | None,
                 stats: PassStats, device: torch.device) -> None:
        self.index, self.config, self.decode, self.on_text = key, config, decode, on_text
        self.lane = Lane(key=key, sequence=ids.reshape(-1).to(device), draws=TokenDraws(config.seed, device),
                         remaining=config.max_new_tokens, sampling=config.sampling)
        self.watcher = StopStringWatcher(decode, config.stop_strings) if decode is not None else None
        self.stop_ids = config.stop_ids
        self.new_tokens: list[int] = []
        self.decoding = False  # in the decoder's lanes (its whole prompt entered); else still joining
        self.finish_reason: str | None = None
        self.stopped_by_string = False
        self.start_stats = stats.snapshot()
        self.start = time.perf_counter()

    def take(self, emitted: list[int]) -> None:
        """Commit an iteration's tokens up to EOS or the token limit; check the stop strings."""
        fresh = []
        for token in emitted:
            fresh.append(token)
            if token in self.stop_ids and len(self.new_tokens) + len(fresh) > self.config.min_new_tokens:
                self.finish_reason = "stop"
                break
            if len(self.new_tokens) + len(fresh) >= self.config.max_new_tokens:
                self.finish_reason = "length"
                break
        self.new_tokens += fresh
        self.lane.extend(fresh)
        self.lane.remaining = self.config.max_new_tokens - len(self.new_tokens)
        if self.watcher is not None and (self.config.stop_strings or self.on_text):
            piece, self.stopped_by_string = self.watcher.update(self.new_tokens)
            if self.stopped_by_string:
                self.finish_reason = "stop"
            if self.on_text and piece:
                self.on_text(piece)

    def result(self, stats: PassStats) -> GenerationResult:
        """What the run produced: its text (a whole decode, cut at a stop string) and its tokens (those
        the text holds: none past a stop string)."""
        elapsed = time.perf_counter() - self.start
        text, tokens = None, self.new_tokens
        if self.watcher is not None:
            if self.stopped_by_string:
                tokens = tokens[: tokens_of_text(self.decode, tokens, len(self.watcher.text))]
            else:
                self.watcher.text = self.decode(self.new_tokens)
            tail = self.watcher.finish()
            if self.on_text and tail:
                self.on_text(tail)
            text = self.watcher.text
        return GenerationResult(tokens, text, self.finish_reason or "length", elapsed,
                                stats.since(self.start_stats))


class Batch:
    """The runs decoding together (continuous batching): `start` a run at any time, `step` advances all of
    them by one iteration (one target pass) and hands back those that finished, `drop` frees a run that
    is no longer wanted. A run that joins while others decode enters its prompt in pieces over the next
    passes (chunked prefill, decoding/prefill.py). decoding/runner.py drives one for every front door."""

    def __init__(self, decoder: LaneDecoder) -> None:
        self.decoder = decoder
        self.runs: list[Run] = []
        self.prefill_pieces = 0  # joining prompts' pieces fed so far (a prompt entering over k passes: k - 1)

    @property
    def stats(self) -> PassStats:
        return self.decoder.stats

    def start(self, key: int, ids: torch.Tensor, config: GenerationConfig,
              decode: Callable[[list[int]], str] | None = None,
              on_text: Callable[[str], None] | None = None) -> Run:
        """A new run for prompt `ids` ([L] or [1, L]); it joins at the next `step`. `key`: unique among
        the runs of this batch's decoder."""
        if ids.numel() == 0:
            raise UsageError("the prompt is empty")
        if (config.stop_strings or on_text) and decode is None:
            raise ValueError("stop strings and streaming need a decode function")
        run = Run(key, ids, config, decode, on_text, self.decoder.stats, self.decoder.device)
        self.runs.append(run)
        return run

    def step(self) -> list[Run]:
        """One iteration over every run; returns the runs that finished, already removed."""
        pieces = self._join()
        decoding = [run for run in self.runs if run.decoding]
        for run, emitted in zip(decoding, self.decoder.step([run.lane for run in decoding], pieces),
                                strict=True):
            run.take(emitted)
        finished = [run for run in self.runs if run.finish_reason is not None]
        for run in finished:
            self.drop(run)
        return finished

    def prefill_budget(self, n_decoding: int, n_joining: int) -> int | None:
        """Prompt tokens of the `n_joining` joining runs the next pass may take beside `n_decoding`
        decoding runs (None: no limit): the config's `prefill_chunk`, else the measured choice
        (decoding/prefill.py)."""
        chunk = self.decoder.config.prefill_chunk
        if chunk is None:
            return chunk_budget(self.decoder.stats, self.decoder.decode_rows(n_decoding), n_joining)
        return chunk or None

    def _join(self) -> tuple[Piece, ...]:
        """Move joining runs whose prompt fits this pass into the decoding ones; the pieces of the next
        prompts fill the rest of the pass. With nothing decoding, every joining run enters whole."""
        joining = [run for run in self.runs if not run.decoding]
        if not joining:
            return ()
        n_decoding = len(self.runs) - len(joining)
        budget = self.prefill_budget(n_decoding, len(joining)) if n_decoding else None
        joins, pieces = plan_pieces([run.lane for run in joining], budget)
        joined = {id(lane) for lane in joins}
        for run in joining:
            run.decoding = id(run.lane) in joined
        self.prefill_pieces += len(pieces)
        return tuple(pieces)

    def drop(self, run: Run) -> None:
        """Free a run's cache slots and forget it (finished, or cancelled by its client)."""
        self.decoder.remove(run.lane)
        self.runs.remove(run)


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
    batch = Batch(make_decoder(target, draft, config, 1))
    run = batch.start(0, input_ids, config, decode, on_text)
    while not batch.step():
        pass
    return run.result(batch.stats)
