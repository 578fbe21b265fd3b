"""The one continuous-batch runner (decoding/runner.py) that generate, the server and Ray workers drive:
results equal plain decoding, jobs join as lanes free up, a solo job never shares a pass, a job that
cannot start fails alone, a failed pass fails only its own jobs (the waiting ones run after, on a fresh
batch), and a cancelled job is dropped."""

from __future__ import annotations

import torch
from tiny_pairs import tiny_pair

from specexec_cli.decoding.config import GenerationConfig, TreeConfig
from specexec_cli.decoding.generate import Batch, generate, make_decoder
from specexec_cli.decoding.runner import BatchRunner, Job

PROMPTS = [torch.tensor([5 + i, 17, 3 + i, 99][: 2 + i % 3]) for i in range(7)]
CONFIG = GenerationConfig(method="specexec", max_new_tokens=8, tree=TreeConfig(budget=8, max_n_beams=4))


class Spy(Batch):
    """A Batch recording which job keys share each pass; raises in the pass numbers in `fail_at`."""

    def __init__(self, decoder, passes: list[set[int]], fail_at: set[int]) -> None:
        super().__init__(decoder)
        self.passes, self.fail_at = passes, fail_at

    def step(self):
        self.passes.append({run.index for run in self.runs})
        if len(self.passes) in self.fail_at:
            raise RuntimeError("out of memory")
        return super().step()


def runner_for(lanes: int, passes: list[set[int]], fail_at: set[int] = frozenset()):
    target, draft = tiny_pair("llama")
    batches: list[Spy] = []

    def make() -> Spy:
        batches.append(Spy(make_decoder(target, draft, CONFIG, lanes), passes, fail_at))
        return batches[-1]

    return BatchRunner(make, lanes), (target, draft), batches


def drain(runner: BatchRunner) -> list:
    outcomes = []
    while not runner.idle:
        outcomes += runner.step()[0]
    return outcomes


def test_the_runner_equals_plain_decoding_and_fills_free_lanes():
    passes: list[set[int]] = []
    runner, (target, draft), _ = runner_for(3, passes)
    for key, ids in enumerate(PROMPTS):
        runner.add(Job(key, ids, CONFIG))
    outcomes = drain(runner)
    assert sorted(o.job.key for o in outcomes) == list(range(len(PROMPTS)))
    plain = GenerationConfig(method="autoregressive", max_new_tokens=8)
    for outcome in outcomes:
        assert outcome.error is None
        assert outcome.result.token_ids == generate(target, None, PROMPTS[outcome.job.key], plain).token_ids
    assert max(len(p) for p in passes) == 3 and all(len(p) <= 3 for p in passes)


def test_a_solo_job_runs_alone_and_a_bad_one_fails_alone():
    passes: list[set[int]] = []
    runner, _, _ = runner_for(3, passes)
    runner.add(Job(0, PROMPTS[0], CONFIG))
    runner.add(Job(1, torch.tensor([], dtype=torch.long), CONFIG))  # an empty prompt cannot start
    runner.add(Job(2, PROMPTS[2], CONFIG, solo=True))
    runner.add(Job(3, PROMPTS[3], CONFIG))
    outcomes = {o.job.key: o for o in drain(runner)}
    assert outcomes[1].error is not None and not outcomes[1].in_pass and not outcomes[1].shared
    assert all(outcomes[k].result is not None for k in (0, 2, 3))
    assert all(p == {2} for p in passes if 2 in p)  # never with another job


def test_a_group_shares_passes_only_within_itself():
    passes: list[set[int]] = []
    runner, _, _ = runner_for(3, passes)
    runner.add(Job(0, PROMPTS[0], CONFIG))
    runner.add(Job(1, PROMPTS[1], CONFIG, group=7))
    runner.add(Job(2, PROMPTS[2], CONFIG, group=7))
    runner.add(Job(3, PROMPTS[3], CONFIG))
    outcomes = drain(runner)
    assert sorted(o.job.key for o in outcomes) == [0, 1, 2, 3] and all(o.result is not None for o in outcomes)
    assert all(p <= {1, 2} or not p & {1, 2} for p in passes)  # the group never shares with others
    assert {1, 2} in passes  # ... but shares within itself


def test_a_failed_pass_fails_only_its_jobs_and_the_next_batch_is_fresh():
    passes: list[set[int]] = []
    runner, _, batches = runner_for(2, passes, fail_at={1})
    for key in range(4):
        runner.add(Job(key, PROMPTS[key], CONFIG))
    outcomes = {o.job.key: o for o in drain(runner)}
    assert passes[0] == {0, 1}
    assert all(outcomes[k].error is not None and outcomes[k].in_pass and outcomes[k].shared for k in (0, 1))
    assert all(outcomes[k].result is not None for k in (2, 3))  # waiting jobs were untouched
    assert len(batches) == 2 and all(2 not in p and 3 not in p for p in passes[:1])


def test_a_cancelled_job_is_dropped_waiting_or_running():
    passes: list[set[int]] = []
    runner, _, _ = runner_for(1, passes)
    for key in range(3):
        runner.add(Job(key, PROMPTS[key], CONFIG))
    runner.step()  # job 0 runs
    runner.cancel(0)
    runner.cancel(2)  # still waiting
    outcomes, dropped = runner.step()
    assert sorted(job.key for job in dropped) == [0, 2]
    outcomes += drain(runner)
    assert [o.job.key for o in outcomes] == [1]
