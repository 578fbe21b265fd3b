"""A cluster worker's batch loop (specexec_cli/cluster/worker.BatchLoop) in this process, without Ray, on
tiny models: results equal plain target decoding, a solo prompt never shares a pass, a failed shared pass
fails each of its prompts as shared (and they then succeed alone), a crashed engine thread is an error at
the next exchange instead of a hang."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import save_tiny_cli_pair

from specexec_cli.cluster import worker as worker_module
from specexec_cli.cluster.ledger import Item
from specexec_cli.cluster.worker import BatchLoop
from specexec_cli.decoding.config import GenerationConfig
from specexec_cli.decoding.generate import Batch, generate
from specexec_cli.engine import EngineRequest, Workload, open_engine
from specexec_cli.errors import SpecexecError
from specexec_cli.prompts import Prompt, encode

PROMPTS = [Prompt(str(i), " ".join(f"w{(5 * i + j) % 40 + 2}" for j in range(1 + i % 4))) for i in range(7)]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker_models")
    save_tiny_cli_pair(root, positions=64)
    request = EngineRequest(target=str(root / "target"), draft=str(root / "draft"), batch_size=3,
                            use_profile=False)
    return open_engine(request, Workload.uniform(16, NEW_TOKENS, 3))


def loop_for(engine) -> BatchLoop:
    return BatchLoop(engine, engine.config(NEW_TOKENS), None, False, {"node": "here", "actor": "a1"})


def collect(loop: BatchLoop, items: list[tuple[Item, Prompt]], count: int) -> list[dict]:
    outcomes = loop.exchange(items, 0.1)
    deadline = time.monotonic() + 120
    while len(outcomes) < count:
        assert time.monotonic() < deadline, outcomes
        outcomes += loop.exchange([], 0.5)
    return outcomes


def plain_text(engine, prompt: Prompt) -> str:
    """Plain target decoding of one prompt: the reference."""
    pair = engine.pair
    ids = torch.tensor(encode(pair.tokenizer, prompt, None, False))
    plain = GenerationConfig(method="autoregressive", max_new_tokens=NEW_TOKENS,
                             eos_token_ids=pair.eos_token_ids)
    result = generate(pair.target, None, ids, plain)
    return pair.tokenizer.decode(result.token_ids, skip_special_tokens=True)


class SpyBatch(Batch):
    """Batch that records which runs share each pass; fails the first shared pass when `fail_shared`."""

    passes: list[list[int]] = []
    fail_shared = False

    def step(self):
        keys = sorted(run.index for run in self.runs)
        SpyBatch.passes.append(keys)
        if SpyBatch.fail_shared and len(keys) > 1:
            SpyBatch.fail_shared = False
            raise RuntimeError("injected failure of a shared pass")
        return super().step()


@pytest.fixture
def spy(monkeypatch):
    SpyBatch.passes, SpyBatch.fail_shared = [], False
    monkeypatch.setattr(worker_module, "Batch", SpyBatch)
    return SpyBatch


def test_results_equal_plain_decoding_and_carry_the_worker(engine) -> None:
    loop = loop_for(engine)
    items = [(Item(i), prompt) for i, prompt in enumerate(PROMPTS)]
    outcomes = loop.exchange(items[:4], 0.5)  # the rest arrive while these decode
    outcomes += collect(loop, items[4:], len(PROMPTS) - len(outcomes))
    outcomes = sorted(outcomes, key=lambda outcome: outcome["index"])
    assert [outcome["index"] for outcome in outcomes] == list(range(len(PROMPTS)))
    for outcome, prompt in zip(outcomes, PROMPTS, strict=True):
        assert outcome["text"] == plain_text(engine, prompt)
        assert outcome["record"]["id"] == prompt.id and outcome["record"]["worker"] == loop.where


def test_prompts_sent_again_are_not_run_twice(engine) -> None:
    """The driver resends an exchange whose answer it lost: the prompts it already holds are not queued
    again, so each is answered once."""
    loop = loop_for(engine)
    items = [(Item(i), prompt) for i, prompt in enumerate(PROMPTS[:3])]
    outcomes = loop.exchange(items, 0.0) + collect(loop, items, 3)
    outcomes += loop.exchange([], 1.0)  # nothing more comes
    assert sorted(outcome["index"] for outcome in outcomes) == [0, 1, 2]
    assert all("record" in outcome for outcome in outcomes)


def test_exchange_answers_while_a_pass_is_stuck_and_reports_pass_progress(engine, monkeypatch) -> None:
    """The driver judges a hang by the passes: while the engine thread sits in a pass, exchange still
    answers, with the time that pass has run; afterwards the passes are counted and timed."""
    stuck = iter([1.5])
    monkeypatch.setattr(worker_module.faults, "before_pass", lambda: time.sleep(next(stuck, 0.0)))
    loop = loop_for(engine)
    assert loop.exchange([(Item(0), PROMPTS[0])], 0.5) == []  # answered although the pass is stuck
    assert loop.progress()["busy_s"] >= 0.3 and loop.progress()["passes"] == 0
    collect(loop, [], 1)
    progress = loop.progress()
    assert progress["passes"] >= 1 and progress["worst_s"] >= 1.5 and progress["busy_s"] == 0.0


def test_a_solo_prompt_never_shares_a_pass(engine, spy) -> None:
    loop = loop_for(engine)
    items = [(Item(i, solo=(i == 2)), prompt) for i, prompt in enumerate(PROMPTS[:5])]
    outcomes = collect(loop, items, 5)
    assert all("record" in outcome for outcome in outcomes)
    with_solo = [keys for keys in spy.passes if 2 in keys]
    assert with_solo and all(keys == [2] for keys in with_solo)
    assert any(len(keys) > 1 for keys in spy.passes)  # the others did share


def test_a_failed_shared_pass_fails_its_prompts_as_shared_and_they_succeed_alone(engine, spy) -> None:
    loop = loop_for(engine)
    spy.fail_shared = True
    outcomes = collect(loop, [(Item(i), prompt) for i, prompt in enumerate(PROMPTS[:3])], 3)
    assert sorted(outcome["index"] for outcome in outcomes) == [0, 1, 2]
    assert all(outcome.get("shared") is True for outcome in outcomes)
    assert all("injected failure" in outcome["error"] for outcome in outcomes)
    again = collect(loop, [(Item(i, solo=True), prompt) for i, prompt in enumerate(PROMPTS[:3])], 3)
    assert all(outcome["text"] == plain_text(engine, PROMPTS[outcome["index"]]) for outcome in again)


def test_a_prompt_too_long_fails_alone_and_the_others_run(engine) -> None:
    loop = loop_for(engine)
    long = Prompt("long", " ".join(["w3"] * 60))  # 60 + 10 new tokens > 64 positions
    outcomes = collect(loop, [(Item(0), PROMPTS[0]), (Item(1), long), (Item(2), PROMPTS[1])], 3)
    by_index = {outcome["index"]: outcome for outcome in outcomes}
    assert by_index[1]["shared"] is False and "exceeds the model's context of 64" in by_index[1]["error"]
    assert "record" in by_index[0] and "record" in by_index[2]


def test_a_crashed_engine_thread_is_an_error_at_the_next_exchange(engine, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(worker_module, "make_decoder", broken)
    loop = loop_for(engine)
    with pytest.raises(SpecexecError, match="the engine thread stopped: unexpected ZeroDivisionError"):
        collect(loop, [(Item(0), PROMPTS[0])], 1)
