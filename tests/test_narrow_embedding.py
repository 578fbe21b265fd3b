"""A float16 checkpoint computed in float32 keeps its (untied) input embedding in float16: the same
logits to the bit, half the table's memory, counted by the memory plan; a tied table is left alone."""

from __future__ import annotations

import pytest
import torch
from tiny_pairs import tiny_model
from transformers import AutoModelForCausalLM

from specexec_cli.models.load import keep_embedding_narrow
from specexec_cli.runtime import target as target_module
from specexec_cli.runtime.embedding import UpcastEmbedding
from specexec_cli.runtime.plan import HardwareFacts
from specexec_cli.runtime.target import load_offloaded_target, model_bytes, plan_target

pytestmark = pytest.mark.usefixtures("one_thread")
ROOMY = HardwareFacts(device_mem_free=8 << 30, host_ram_available=8 << 30, disk_free=1 << 40, unified=True)


def fp16_checkpoint(folder, tied: bool = False):
    model = tiny_model("llama", 2, seed=0, vocab=512, hidden=64, dtype=torch.float16,
                       initializer_range=0.1, tie_word_embeddings=tied)
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # the float32 reference


def test_offloaded_target_keeps_the_embedding_narrow_with_the_same_logits(tmp_path, monkeypatch):
    ref = fp16_checkpoint(tmp_path)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    model = load_offloaded_target(tmp_path, device="cpu", dtype=torch.float32, offload="ram",
                                  resident_layers=0, hardware=ROOMY)
    embed = model.get_input_embeddings()
    assert isinstance(embed, UpcastEmbedding) and embed.weight.dtype == torch.float16
    assert model.dtype == torch.float32 and model.device.type == "cpu"  # read from the first parameter
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # float16 rows upcast == float32 copies
    # the plan counts the table at 2 bytes per weight: 512 x 64 x 2 bytes less than in float32
    options = dict(device="cpu", dtype=torch.float32, offload="ram", resident_layers=0, budget=8,
                   hardware=ROOMY)
    narrow = plan_target(tmp_path, **options)
    monkeypatch.setattr(target_module, "_narrow_resident", lambda *args: {})
    wide = plan_target(tmp_path, **options)
    assert wide.device_bytes - narrow.device_bytes == 512 * 64 * 2
    model.offload_engine.close()


def test_a_tied_table_stays_as_it_is(tmp_path):
    fp16_checkpoint(tmp_path, tied=True)
    model = load_offloaded_target(tmp_path, device="cpu", dtype=torch.float32, offload="ram",
                                  resident_layers=0, hardware=ROOMY)
    assert not isinstance(model.get_input_embeddings(), UpcastEmbedding)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    model.offload_engine.close()


def test_a_resident_model_loaded_in_float32_keeps_its_embedding_narrow(tmp_path):
    ref = fp16_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    before = model_bytes(model)
    assert keep_embedding_narrow(model, tmp_path)
    assert before - model_bytes(model) == 512 * 64 * 2
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert not keep_embedding_narrow(model, tmp_path)  # once is enough
