"""The fast GGUF conversion (models/gguf_file.py, models/gguf_convert.py) against transformers' own GGUF
loader, on a tiny Qwen2 GGUF file written here with the `gguf` package (float32, Q8_0 and float16
tensors, a byte-level BPE vocabulary)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from specexec_cli.errors import SpecexecError  # noqa: E402
from specexec_cli.models import gguf_convert  # noqa: E402
from specexec_cli.models.gguf_file import read_gguf  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 96, 2, 4, 2


def byte_vocab() -> tuple[list[str], list[str]]:
    """GPT-2 style byte-level tokens (every byte as a printable character) plus a few merges."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    merges = ["h e", "l l", "he ll", "o Ġ"]
    tokens = chars + ["he", "ll", "hell", "oĠ", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return tokens, merges


def write_tiny_qwen2(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Qwen2 GGUF; returns the float32 values each tensor should dequantize to (GGUF names)."""
    rng = np.random.default_rng(seed)
    tokens, merges = byte_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 3) + [3, 3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_pad_token_id(vocab - 3)
    expected: dict[str, np.ndarray] = {}

    def add(name: str, shape: tuple[int, ...], kind: str = "f32") -> None:
        values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if kind == "q8_0":
            raw = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(shape)
        elif kind == "f16":
            values = values.astype(np.float16)
            w.add_tensor(name, values)
            values = values.astype(np.float32)
        else:
            w.add_tensor(name, values)
        expected[name] = values

    add("token_embd.weight", (vocab, HIDDEN), "q8_0")
    add("output_norm.weight", (HIDDEN,))
    add("output.weight", (vocab, HIDDEN), "f16")
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,))
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), "q8_0")
        add(f"blk.{i}.attn_q.bias", (HIDDEN,))
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN), "q8_0")
        add(f"blk.{i}.attn_k.bias", (KV_HEADS * head_dim,))
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN), "f16")
        add(f"blk.{i}.attn_v.bias", (KV_HEADS * head_dim,))
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), "q8_0")
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), "q8_0")
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), "q8_0")
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), "q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    expected = write_tiny_qwen2(folder / "tiny.gguf")
    return folder / "tiny.gguf", expected


def test_parser_reads_metadata_and_dequantizes(tiny_gguf):
    path, expected = tiny_gguf
    g = read_gguf(path)
    assert g.architecture == "qwen2" and g.metadata["qwen2.block_count"] == LAYERS
    assert g.metadata["tokenizer.ggml.tokens"][:3] == ["Ā", "ā", "Ă"]
    assert set(g.tensors) == set(expected)
    assert g.tensors["blk.0.ffn_down.weight"].shape == (HIDDEN, FFN)  # numpy order
    for name, values in expected.items():
        np.testing.assert_array_equal(g.dequantize(name), values)
    assert g.digest("tokenizer.") == read_gguf(path).digest("tokenizer.")
    assert g.digest("tokenizer.") != g.digest("qwen2.")


def test_truncated_file_is_a_clear_error(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(SpecexecError, match="truncated"):
        read_gguf(cut)
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(SpecexecError, match="not a GGUF file"):
        read_gguf(tmp_path / "not.gguf")


def test_fast_conversion_equals_transformers_gguf_loader(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = tiny_gguf
    out = tmp_path / "out"
    out.mkdir()
    generation = gguf_convert.convert(read_gguf(path), out, tmp_path / "tokenizers", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours = load_file(out / "model.safetensors")
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    config = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "max_position_embeddings"):
        assert config[key] == getattr(ref.config, key), key
    assert generation.eos_token_id == ref.config.eos_token_id
    tok_ours = AutoTokenizer.from_pretrained(out)
    tok_ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok_ours("hello world").input_ids == tok_ref("hello world").input_ids
    # the tokenizer is built once per vocabulary: a second conversion copies it
    again = tmp_path / "again"
    again.mkdir()
    gguf_convert.write_tokenizer(read_gguf(path), again, tmp_path / "tokenizers")
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
