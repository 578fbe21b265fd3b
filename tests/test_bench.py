"""Fast tests of the decoding benchmark: Llama-2 wrapper stripping on real prompt lines, table formatting,
and a tiny end-to-end run of every method on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from specexec_cli.bench import (
    BenchPlan,
    BenchRow,
    ForwardMeter,
    assisted_kwargs,
    bench_rows,
    encode_chat,
    format_report,
    format_table,
    load_conversations,
    load_prompt_set,
    parse_budgets,
    parse_llama2_chat,
    parse_methods,
    resolve_prompt_path,
    strip_llama2_wrapper,
)
from specexec_cli.decoding.config import SamplingConfig, TreeConfig
from specexec_cli.errors import UsageError
from tests.tiny_pairs import tiny_pair

OASST_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, "
    "or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
# Verbatim items of ../shared/data/prompts/mtbench.json and oasst.json (note `<</SYS>` and `[\INST]`).
MTBENCH_LINE = [35, "[INST]x+y = 4z, x*y = 4z^2, express x-y in z[/INST]\n\nASSISTANT:"]
CHINESE = "\u628a\u8fd9\u53e5\u8bdd\u7ffb\u8bd1\u4e00\u4e0b"
OASST_SINGLE = [161, f"[INST] <<SYS>>\n{OASST_SYSTEM}\n<</SYS>\n\n\n{CHINESE} [\\INST]\n"]
OASST_MULTI = [
    254,
    f"[INST] <<SYS>>\n{OASST_SYSTEM}\n<</SYS>\n\n\nHello there Obi One Kenobi [\\INST]\nYou're a bold one.\n"
    "[INST] Explain me Motion Matching animation technology. [\\INST]\n",
]


def test_mtbench_line_is_stripped_to_the_user_text() -> None:
    assert strip_llama2_wrapper(MTBENCH_LINE[1]) == "x+y = 4z, x*y = 4z^2, express x-y in z"
    assert parse_llama2_chat(MTBENCH_LINE[1]) == [
        {"role": "user", "content": "x+y = 4z, x*y = 4z^2, express x-y in z"}
    ]


def test_oasst_single_turn_keeps_system_and_drops_misspelled_markers() -> None:
    messages = parse_llama2_chat(OASST_SINGLE[1])
    assert messages == [
        {"role": "system", "content": OASST_SYSTEM},
        {"role": "user", "content": CHINESE},
    ]


def test_oasst_multi_turn_becomes_a_conversation() -> None:
    messages = parse_llama2_chat(OASST_MULTI[1])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Hello there Obi One Kenobi"
    assert messages[2]["content"] == "You're a bold one."
    assert strip_llama2_wrapper(OASST_MULTI[1]) == "Explain me Motion Matching animation technology."


@pytest.mark.parametrize(
    "text, expected",
    [
        ("plain question?", "plain question?"),
        ("<s>[INST] hi [/INST]</s>", "hi"),
        ("[ INST ]spaced[ /INST ]", "spaced"),
        ("[INST] <<SYS>> be brief <</SYS>> q [/INST] ASSISTANT:", "q"),
    ],
)
def test_wrapper_variants(text: str, expected: str) -> None:
    assert strip_llama2_wrapper(text) == expected
    assert "INST" not in json.dumps(parse_llama2_chat(text))


def test_load_prompt_set_reads_a_file(tmp_path) -> None:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([MTBENCH_LINE, OASST_SINGLE, OASST_MULTI]), encoding="utf-8")
    assert load_prompt_set(path, 2) == [
        ("35", "x+y = 4z, x*y = 4z^2, express x-y in z"),
        ("161", CHINESE),
    ]
    assert len(load_conversations(path, None)[2][1]) == 4
    with pytest.raises(UsageError):
        resolve_prompt_path(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["mtbench.json", "oasst.json"])
def test_shared_prompt_files_strip_cleanly(name: str) -> None:
    try:
        path = resolve_prompt_path(f"../shared/data/prompts/{name}")
    except UsageError:
        pytest.skip("shared prompt files not present")
    for _, messages in load_conversations(path, None):
        assert messages[-1]["role"] == "user" and messages[-1]["content"]
        for message in messages:
            for marker in ("[INST", "INST]", "SYS>", "ASSISTANT:"):
                assert marker not in message["content"]


def test_encode_chat_uses_the_chat_template(make_word_tokenizer) -> None:
    tokenizer = make_word_tokenizer(["hello", "world", "USER", "BOT"])
    tokenizer.chat_template = (
        "{% for m in messages %}{{ 'USER ' if m.role == 'user' else 'BOT ' }}{{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}BOT{% endif %}"
    )
    ids = encode_chat(tokenizer, [{"role": "user", "content": "hello world"}])
    assert tokenizer.convert_ids_to_tokens(ids.tolist()) == ["USER", "hello", "world", "BOT"]


def test_budget_and_method_parsing() -> None:
    assert parse_budgets("16, 64,256") == (16, 64, 256)
    assert parse_methods("SpecExec,assisted") == ("specexec", "assisted")
    for bad in ("0", "x"):
        with pytest.raises(UsageError):
            parse_budgets(bad)
    with pytest.raises(UsageError):
        parse_methods("medusa")


def _row(method: str, budget: int | None, tokens: int, passes: int, elapsed: float) -> BenchRow:
    row = BenchRow(method, budget, 0.0, n_prompts=2, new_tokens=tokens, target_passes=passes,
                   draft_passes=3 * passes, iterations=passes, elapsed_s=elapsed, target_s=elapsed * 0.8,
                   draft_s=elapsed * 0.15)
    return row


def test_table_formatting() -> None:
    rows = [_row("autoregressive", None, 128, 128, 64.0), _row("specexec", 256, 128, 20, 32.0)]
    rows[0].speedup, rows[1].speedup = 1.0, 2.0
    rows[0].greedy_matches, rows[1].greedy_matches = 2, 2
    rows[1].settings = "beams 16, len 8, width 8"
    table = format_table(rows, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and lines[2].startswith("| method | budget | tok/pass | tok/s | speedup")
    assert lines[4] == "| autoregressive | - | 1.00 | 2.00 | 1.00 | 5.0 | 3.0 | 0.40 | 2/2 |  |"
    assert lines[5] == ("| specexec | 256 | 6.40 | 4.00 | 2.00 | 5.0 | 3.0 | 1.28 | 2/2 "
                        "| beams 16, len 8, width 8 |")
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:])
    report = format_report(rows, "pair")
    assert report.startswith("pair, t=0\n") and report.endswith("|\n")


def test_forward_meter_counts_calls_and_removes_hooks() -> None:
    model = torch.nn.Linear(2, 2)
    with ForwardMeter(model) as meter:
        model(torch.ones(1, 2))
        model(torch.ones(1, 2))
    model(torch.ones(1, 2))
    assert meter.calls == 2 and meter.seconds >= 0.0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_assisted_kwargs_match_the_engine_sampling() -> None:
    greedy = assisted_kwargs(SamplingConfig(), (7, 8), 64)
    assert greedy["do_sample"] is False and greedy["eos_token_id"] == [7, 8] and greedy["pad_token_id"] == 7
    sampled = assisted_kwargs(SamplingConfig(temperature=0.6), (), 64)
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.6
    assert sampled["top_k"] == 0 and sampled["top_p"] == 1.0 and sampled["repetition_penalty"] == 1.0


def test_without_autoregressive_speedup_and_matches_stay_empty() -> None:
    target, draft = tiny_pair("qwen2")
    plan = BenchPlan(temperatures=(0.0,), methods=("specexec",), specexec_budgets=(4,), max_new_tokens=4,
                     tree=TreeConfig(budget=1, max_n_beams=2, max_beam_len=2, max_branch_width=2))
    rows = bench_rows(target, draft, [torch.tensor([1, 2, 3])], plan, eos_ids=())
    assert [(r.method, r.speedup, r.greedy_matches) for r in rows] == [("specexec", None, None)]
    assert "| specexec | 4 |" in format_table(rows)


def test_tiny_bench_run_has_every_method_and_reference_speedup_one() -> None:
    target, draft = tiny_pair("llama")
    prompt = torch.tensor([5, 17, 42, 9, 77, 3], dtype=torch.long)
    plan = BenchPlan(temperatures=(0.0, 0.6), specexec_budgets=(4, 16), specinfer_budgets=(4,),
                     tree=TreeConfig(budget=1, max_n_beams=4, max_beam_len=4, max_branch_width=4),
                     max_new_tokens=8)
    rows = bench_rows(target, draft, [prompt], plan, eos_ids=())
    labels = [(r.method, r.budget, r.temperature) for r in rows]
    assert labels == [(m, b, t) for t in (0.0, 0.6) for m, b in
                      [("autoregressive", None), ("specexec", 4), ("specexec", 16), ("specinfer", 4),
                       ("assisted", None)]]
    for row in rows:
        assert row.n_prompts == 1 and row.new_tokens == 8
        assert row.target_passes >= 1 and row.elapsed_s > 0
        assert 0.0 <= row.host_share <= 1.0 and math.isfinite(row.tokens_per_s)
        record = row.to_dict()
        for key in ("method", "budget", "temperature", "tokens_per_pass", "tokens_per_s", "speedup",
                    "host_share", "draft_passes_per_iteration", "greedy_matches", "settings"):
            assert key in record
        if row.method == "autoregressive":
            assert row.speedup == 1.0 and row.tokens_per_pass == 1.0 and row.draft_passes == 0
        else:
            assert row.draft_passes > 0
    greedy = [r for r in rows if r.temperature == 0.0]
    assert all(r.greedy_matches == 1 for r in greedy if r.method != "assisted")  # lossless engine
    assert all(r.greedy_matches is None for r in rows if r.temperature > 0)
    assert "num_assistant_tokens" in rows[-1].settings
    assert format_report(rows, "tiny").count("| autoregressive |") == 2
