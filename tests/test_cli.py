"""The `specexec generate` command on tiny models saved to disk: output channels, inputs, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_VOCAB, _word_tokenizer, save_tiny_cli_pair
from transformers import LlamaConfig, LlamaForCausalLM

from specexec_cli.cli import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Folders holding a tiny float32 target and draft with a word-level tokenizer (no download)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_cli_pair(root)
    other = _word_tokenizer([f"x{i}" for i in range(TINY_VOCAB - 4)])
    torch.manual_seed(5)
    stranger = LlamaForCausalLM(LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2))
    stranger.save_pretrained(root / "stranger")
    other.save_pretrained(root / "stranger")
    return root


def run(model_dirs, *args, input=None):
    base = ["generate", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
            "--no-chat-template", "-n", "6"]
    return CliRunner().invoke(main, base + list(args), input=input)


def test_text_goes_to_stdout_only(model_dirs):
    result = run(model_dirs, "-p", "w1 w2 w3")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and all(word.startswith("w") for word in result.stdout.split())
    assert "loading target" in result.stderr and "loading" not in result.stdout


def test_speculative_output_equals_autoregressive(model_dirs):
    fast = run(model_dirs, "-p", "w5 w9", "--budget", "32")
    plain = run(model_dirs, "-p", "w5 w9", "--method", "autoregressive")
    assert fast.exit_code == plain.exit_code == 0
    assert fast.stdout == plain.stdout


def test_json_lines_from_jsonl_file(model_dirs, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "w1 w2"}\n\n{"id": 7, "prompt": "w3"}\n')
    result = run(model_dirs, "-f", str(source), "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["a", "7"]
    for record in records:
        assert {"text", "new_tokens", "finish_reason", "tokens_per_s", "tokens_per_target_pass",
                "target_passes"} <= record.keys()
        assert 1 <= record["new_tokens"] <= 6 and record["finish_reason"] in ("stop", "length")


def test_chat_lines_are_encoded_as_their_messages(model_dirs, tmp_path):
    """{"id", "messages"} lines (chat requests): one user turn is the same prompt as {"prompt"}; a system
    turn in the chat is the same as --system."""
    source = tmp_path / "chat.jsonl"
    lines = [{"id": "u", "messages": [{"role": "user", "content": "w1 w2"}]},
             {"id": "s", "messages": [{"role": "system", "content": "w9"},
                                      {"role": "user", "content": "w3"}]}]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    chat = run(model_dirs, "-f", str(source), "--json", "--batch-size", "1")
    assert chat.exit_code == 0, chat.stderr
    records = {r["id"]: r["text"] for r in map(json.loads, chat.stdout.splitlines())}
    assert records["u"] + "\n" == run(model_dirs, "-p", "w1 w2").stdout
    assert records["s"] + "\n" == run(model_dirs, "-p", "w3", "--system", "w9").stdout


@pytest.mark.parametrize("line,needle", [
    ('{"messages": []}', '"messages" must be a non-empty list'),
    ('{"messages": [{"role": "robot", "content": "w1"}]}', "role 'robot'"),
    ('{"messages": [{"role": "system", "content": "w1"}]}', "no user turn"),
    ('{"messages": [{"role": "user"}]}', 'needs a "content"'),
])
def test_bad_chat_lines_name_the_line(model_dirs, tmp_path, line, needle):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "w1"}\n' + line + "\n")
    result = run(model_dirs, "-f", str(source))
    assert result.exit_code == 2 and f"{source}:2:" in result.stderr and needle in result.stderr
    assert result.stdout == ""


def test_stdin_plain_and_dash(model_dirs):
    piped = run(model_dirs, input="w1 w2 w3\n")
    dashed = run(model_dirs, "-p", "-", input="w1 w2 w3\n")
    flagged = run(model_dirs, "-p", "w1 w2 w3")
    assert piped.exit_code == dashed.exit_code == 0
    assert piped.stdout == dashed.stdout == flagged.stdout


def test_stop_string_is_honoured(model_dirs):
    full = run(model_dirs, "-p", "w1 w2 w3", "-n", "12", "--method", "autoregressive").stdout.strip()
    words = full.split()
    assert len(words) >= 3
    stopped = run(model_dirs, "-p", "w1 w2 w3", "-n", "12", "--stop", words[2])
    assert stopped.exit_code == 0
    assert stopped.stdout.strip() == full[: full.index(words[2])].strip()


@pytest.mark.parametrize("args,code,needle", [
    (["--budget", "-4"], 2, "--budget must be >= 1"),
    (["--temperature", "-1"], 2, "--temperature"),
    (["--temperature", "nan"], 2, "--temperature must be a finite number"),
    (["--temperature", "inf"], 2, "--temperature must be a finite number"),
    (["--top-p", "0"], 2, "--top-p"),
    (["--top-p", "nan"], 2, "--top-p"),
    (["--draft", "first-layers:0"], 2, "positive layer count"),
])
def test_bad_flags_give_usage_errors(model_dirs, args, code, needle):
    result = run(model_dirs, "-p", "w1", *args)
    assert result.exit_code == code
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["--ray-workers", "2"], "--ray-workers needs --ray ADDRESS"),
    (["--ray", "local", "--stream"], "--stream prints one prompt at a time on this machine"),
])
def test_ray_flags_that_cannot_work_are_usage_errors(model_dirs, args, needle):
    result = run(model_dirs, "-p", "w1", *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr


def test_ray_without_the_extra_says_how_to_install_it(model_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    result = run(model_dirs, "-p", "w1", "--ray", "local")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: --ray needs Ray on this machine and every node: pip install " \
        "'specexec[ray]'"


@pytest.mark.parametrize("value,needle", [("abc", "is not a whole number"), ("0", "out of range")])
def test_a_bad_read_threads_setting_is_a_usage_error(model_dirs, monkeypatch, value, needle):
    monkeypatch.setenv("SPECEXEC_READ_THREADS", value)
    result = run(model_dirs, "-p", "w1", "--offload", "disk", "--resident-layers", "0")
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SPECEXEC_READ_THREADS=") and needle in last
    assert "Traceback" not in result.stderr


def test_malformed_jsonl_names_the_line(model_dirs, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "w1"}\n{"prompt": "w2"\n')
    result = run(model_dirs, "-f", str(source))
    assert result.exit_code == 2
    assert f"{source}:2:" in result.stderr and result.stdout == ""


def test_unknown_model_is_one_line_error(model_dirs):
    result = CliRunner().invoke(main, ["generate", "--target", "no-such-model-xyz", "-p", "hi"])
    assert result.exit_code == 2  # bad input
    assert "no-such-model-xyz" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_incompatible_tokenizers_are_refused(model_dirs):
    result = run(model_dirs, "-p", "w1", "--draft", str(model_dirs / "stranger"))
    assert result.exit_code == 1
    assert "tokenizer" in result.stderr.lower() and result.stdout == ""


def test_finished_results_survive_a_later_failure(model_dirs, tmp_path):
    too_long = " ".join(["w1"] * 80)  # beyond the tiny target's 64-token context
    source = tmp_path / "batch.jsonl"
    source.write_text(json.dumps({"id": "ok", "prompt": "w1 w2"}) + "\n" +
                      json.dumps({"id": "long", "prompt": too_long}) + "\n")
    result = run(model_dirs, "-f", str(source), "--json")
    assert result.exit_code == 1
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["ok"]
    assert "long" in result.stderr


def test_closed_pipe_ends_quietly(model_dirs, tmp_path):
    source = tmp_path / "many.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"w{i} w2"}) + "\n" for i in range(1, 6)))
    command = [sys.executable, "-m", "specexec_cli", "generate", "--target", str(model_dirs / "target"),
               "--draft", str(model_dirs / "draft"), "--no-chat-template", "-n", "4", "-f", str(source)]
    producer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = producer.stdout.readline()
    producer.stdout.close()  # like `| head -n 1`
    stderr = producer.stderr.read().decode()
    assert producer.wait(timeout=300) == 0
    assert first.strip() and "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_stream_prints_the_same_text(model_dirs):
    plain = run(model_dirs, "-p", "w4 w8")
    streamed = run(model_dirs, "-p", "w4 w8", "--stream")
    assert streamed.exit_code == 0 and streamed.stdout == plain.stdout


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_offloaded_target_gives_the_same_text(model_dirs, tier, tmp_path):
    plain = run(model_dirs, "-p", "w2 w7", "--method", "autoregressive")
    offloaded = run(model_dirs, "-p", "w2 w7", "--offload", tier, "--buffers", "2", "--offload-dir",
                    str(tmp_path))
    assert offloaded.exit_code == 0, offloaded.stderr
    assert offloaded.stdout == plain.stdout
    assert "offload plan" in offloaded.stderr


def test_offload_plan_counts_the_draft(model_dirs, monkeypatch):
    from specexec_cli.runtime import target as target_module

    seen = []
    real = target_module.load_offloaded_target

    def recording(source, **kw):
        seen.append(kw.get("draft"))
        return real(source, **kw)

    monkeypatch.setattr(target_module, "load_offloaded_target", recording)
    separate = run(model_dirs, "-p", "w2 w7", "--offload", "ram")
    early = run(model_dirs, "-p", "w2 w7", "--offload", "ram", "--draft", "first-layers:1")
    assert separate.exit_code == 0 and early.exit_code == 0, separate.stderr + early.stderr
    assert isinstance(seen[0], torch.nn.Module) and seen[0].config.num_hidden_layers == 1
    assert seen[1] is None  # an early-exit draft shares the target's weights: nothing extra to plan
    assert "first 1 layers" in early.stderr
    plain = run(model_dirs, "-p", "w2 w7", "--method", "autoregressive")
    assert early.stdout == separate.stdout == plain.stdout
    streamed = run(model_dirs, "-p", "w2", "--offload", "ram", "--resident-layers", "0",
                   "--draft", "first-layers:1")
    assert streamed.exit_code == 1 and "--resident-layers 1" in streamed.stderr
    assert len(streamed.stderr.strip().splitlines()[-1]) < 200 and "Traceback" not in streamed.stderr


def test_models_lists_the_registry():
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0
    names = {json.loads(line)["name"] for line in result.stdout.splitlines()}
    assert {"llama-3-70b", "llama-2-70b", "mixtral-8x7b", "qwen2.5-72b", "qwen2.5-coder-1.5b"} <= names
    table = CliRunner().invoke(main, ["models"])
    assert "llama-3-70b" in table.stdout and "llama-3.2-1b" in table.stdout


def test_tuned_profile_supplies_settings_and_flags_override(model_dirs, tmp_path, monkeypatch):
    from specexec_cli import hardware, profiles

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    profile = profiles.Profile(target="target", settings={"method": "autoregressive", "budget": 4},
                               fingerprint=hardware.fingerprint())
    profiles.save_profile(profile)
    from_profile = run(model_dirs, "-p", "w3 w4", "--json")
    assert from_profile.exit_code == 0, from_profile.stderr
    assert "profile:" in from_profile.stderr
    assert json.loads(from_profile.stdout)["method"] == "autoregressive"
    overridden = run(model_dirs, "-p", "w3 w4", "--json", "--method", "specexec")
    record = json.loads(overridden.stdout)
    assert record["method"] == "specexec" and record["budget"] == 4
    on_top = next(line for line in overridden.stderr.splitlines() if "flags on top:" in line)
    assert "method=specexec" in on_top
    ignored = run(model_dirs, "-p", "w3 w4", "--json", "--no-profile")
    assert json.loads(ignored.stdout)["method"] == "specexec" and "profile:" not in ignored.stderr
    assert record["text"] == json.loads(from_profile.stdout)["text"]


# --- --batch-size -------------------------------------------------------------------------------


def batch_file(tmp_path, n: int = 7):
    """JSON Lines prompts of very different lengths."""
    source = tmp_path / "many.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": " ".join(f"w{4 + (i * 7 + k) % 90}"
                                                                             for k in range(1 + 5 * i))})
                              + "\n" for i in range(n)))
    return source


@pytest.mark.parametrize("method", ["specexec", "autoregressive"])
def test_batched_results_equal_one_by_one_in_input_order(model_dirs, tmp_path, method):
    source = batch_file(tmp_path)
    alone = run(model_dirs, "-f", str(source), "--json", "--method", method, "--batch-size", "1")
    batched = run(model_dirs, "-f", str(source), "--json", "--method", method, "--batch-size", "3")
    assert alone.exit_code == batched.exit_code == 0, batched.stderr
    one = [json.loads(line) for line in alone.stdout.splitlines()]
    many = [json.loads(line) for line in batched.stdout.splitlines()]
    assert [r["id"] for r in many] == [f"p{i}" for i in range(7)]
    assert [(r["text"], r["finish_reason"]) for r in many] == [(r["text"], r["finish_reason"]) for r in one]
    assert "up to 3 per target pass" in batched.stderr


def test_unordered_writes_every_result_once(model_dirs, tmp_path):
    source = batch_file(tmp_path)
    ordered = run(model_dirs, "-f", str(source), "--json", "--batch-size", "4")
    unordered = run(model_dirs, "-f", str(source), "--json", "--batch-size", "4", "--unordered")
    assert ordered.exit_code == unordered.exit_code == 0, unordered.stderr
    by_id = {json.loads(line)["id"]: json.loads(line)["text"] for line in ordered.stdout.splitlines()}
    records = [json.loads(line) for line in unordered.stdout.splitlines()]
    assert sorted(r["id"] for r in records) == sorted(by_id)
    assert all(by_id[r["id"]] == r["text"] for r in records)


def test_stream_refuses_a_batch(model_dirs):
    result = run(model_dirs, "-p", "w1", "-p", "w2", "--stream", "--batch-size", "2")
    assert result.exit_code == 2 and "--stream" in result.stderr


def test_a_failing_prompt_in_a_batch_keeps_every_earlier_result(model_dirs, tmp_path):
    source = tmp_path / "batch.jsonl"
    prompts = [("a", "w1 w2"), ("b", "w3 w4 w5"), ("c", "w6"), ("long", " ".join(["w1"] * 80))]
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in prompts))
    result = run(model_dirs, "-f", str(source), "--json", "--batch-size", "3")
    assert result.exit_code == 1
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["a", "b", "c"]
    assert "long" in result.stderr.strip().splitlines()[-1]
