"""Known models: targets, their tokenizer-compatible drafts, sizes, and how a name is resolved.

The data lives in `specexec_cli/data/registry.json`. `resolve` turns what a user typed (a registry
alias, a hub id, a local folder or a .gguf file) into a `ModelSpec`; `drafts_for` lists the drafts a
target can use; `list_models` adds whether each model's weights are already on this machine.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from specexec_cli.errors import SpecexecError, UsageError
from specexec_cli.fsutil import expand_user
from specexec_cli.models import bundled

KINDS = ("bundled", "hub", "local", "gguf")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GPTQ_GROUP = 128  # GPTQ group size assumed for the 4-bit size estimate
QUANT_VARIANTS = ("gptq", "awq", "w4a16")  # 4-bit hub variants a registry entry may list
WEIGHT_SUFFIXES = (".safetensors", ".bin")
EARLY_EXIT = "first-layers:"  # `--draft first-layers:N`: the target's first N layers and its head


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from, and what is known about its shape.

    kind: "bundled" (ships in part packages), "hub" (a hub id), "local" (a folder with config.json)
    or "gguf" (a .gguf file). Shape fields are None for models the registry does not know.
    """

    name: str
    kind: str
    hub_id: str | None = None
    gptq_hub_id: str | None = None
    awq_hub_id: str | None = None
    w4a16_hub_id: str | None = None  # compressed-tensors pack-quantized (llm-compressor W4A16)
    path: Path | None = None
    quantization: str | None = None  # "gptq" | "awq" | "w4a16" when the hub id is that 4-bit variant
    role: str | None = None  # "target" or "draft"
    tokenizer_family: str | None = None
    params: int | None = None
    n_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    attention_bias: bool = False
    n_experts: int = 1
    experts_per_token: int = 1
    default_draft: str | None = None
    drafts: tuple[str, ...] = field(default_factory=tuple)
    bundled: bool = False
    description: str = ""

    @property
    def in_registry(self) -> bool:
        return self.n_layers is not None

    @property
    def source(self) -> str:
        """What to load: the local path, else the hub id."""
        return str(self.path) if self.path is not None else (self.hub_id or self.name)

    def variant_id(self, quant: str) -> str | None:
        """The hub id of this model's 4-bit `quant` variant ("gptq", "awq", "w4a16"), or None."""
        return {"gptq": self.gptq_hub_id, "awq": self.awq_hub_id, "w4a16": self.w4a16_hub_id}.get(quant)

    @property
    def variants(self) -> tuple[str, ...]:
        """The 4-bit variants the registry knows for this model, in QUANT_VARIANTS order."""
        return tuple(q for q in QUANT_VARIANTS if self.variant_id(q))

    def quantized_variant(self, quant: str) -> ModelSpec:
        """The same model with its 4-bit `quant` hub id, or a SpecexecError if none is known."""
        if self.quantization == quant:
            return self
        if quant not in QUANT_VARIANTS:
            raise SpecexecError(f"unknown 4-bit variant {quant!r} (known: {', '.join(QUANT_VARIANTS)})")
        hub_id = self.variant_id(quant)
        if not hub_id:
            known = f"; known: {', '.join(self.variants)}" if self.variants else ""
            raise SpecexecError(f"no {quant.upper()} variant of '{self.name}' is known{known}; pass a "
                                f"{quant.upper()} hub id or folder instead")
        return replace(self, kind="hub", hub_id=hub_id, path=None, quantization=quant, bundled=False)

    def gptq_variant(self) -> ModelSpec:
        """The same model with its 4-bit GPTQ hub id, or a SpecexecError if none is known."""
        return self.quantized_variant("gptq")

    # --- sizes (for the memory planner and the tuner); None when the shape is unknown --------

    def _shape_known(self) -> bool:
        return None not in (self.n_layers, self.hidden_size, self.intermediate_size, self.n_heads,
                            self.n_kv_heads, self.head_dim, self.vocab_size)

    def layer_linear_params(self) -> int | None:
        """Weights of one decoder layer's matrices (attention + all experts' MLPs + router)."""
        if not self._shape_known():
            return None
        q_dim = self.n_heads * self.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.hidden_size * (2 * q_dim + 2 * kv_dim)
        mlp = 3 * self.hidden_size * self.intermediate_size * self.n_experts
        return attention + mlp

    def layer_other_params(self) -> int | None:
        """Small per-layer tensors: the two norms, attention biases, the MoE router."""
        if not self._shape_known():
            return None
        other = 2 * self.hidden_size
        if self.attention_bias:
            other += (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        if self.n_experts > 1:
            other += self.hidden_size * self.n_experts
        return other

    def layer_params(self) -> int | None:
        """All parameters of one decoder layer."""
        linear, other = self.layer_linear_params(), self.layer_other_params()
        return None if linear is None or other is None else linear + other

    def layer_active_params(self) -> int | None:
        """Parameters one token touches in a layer (MoE: only its experts_per_token experts)."""
        total = self.layer_params()
        if total is None:
            return None
        inactive = 3 * self.hidden_size * self.intermediate_size * (self.n_experts - self.experts_per_token)
        return total - inactive

    def embedding_params(self) -> int | None:
        """Input embeddings, LM head (0 extra when tied) and the final norm."""
        if not self._shape_known():
            return None
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def total_params(self) -> int | None:
        """Parameter count from the shape (equals `params` for registry entries)."""
        layer, embed = self.layer_params(), self.embedding_params()
        return None if layer is None or embed is None else layer * self.n_layers + embed

    def layer_bytes_fp16(self) -> int | None:
        """Bytes of one decoder layer in 16-bit."""
        params = self.layer_params()
        return None if params is None else 2 * params

    def layer_bytes_4bit(self) -> int | None:
        """Approximate bytes of one decoder layer in 4-bit GPTQ (group 128, fp16 scales, 4-bit zeros)."""
        linear, other = self.layer_linear_params(), self.layer_other_params()
        if linear is None or other is None:
            return None
        per_weight = 0.5 + (2 + 0.5) / GPTQ_GROUP
        return int(linear * per_weight) + 2 * other


def early_exit_layers(draft: str) -> int | None:
    """N for the draft spelling `first-layers:N`, None for any other draft name."""
    if not draft.startswith(EARLY_EXIT):
        return None
    count = draft.removeprefix(EARLY_EXIT)
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"--draft first-layers:N needs a positive layer count, got {count!r}")
    return int(count)


@functools.cache
def _entries() -> dict[str, dict[str, object]]:
    text = resources.files("specexec_cli").joinpath("data/registry.json").read_text(encoding="utf-8")
    return {entry["name"]: entry for entry in json.loads(text)["models"]}


def _spec_from_entry(entry: dict[str, object]) -> ModelSpec:
    fields = {k: v for k, v in entry.items() if k in ModelSpec.__dataclass_fields__}
    fields["drafts"] = tuple(entry.get("drafts") or ())
    kind = "bundled" if entry.get("bundled") else "hub"
    return ModelSpec(kind=kind, **fields)


def registry_names() -> list[str]:
    """All registry aliases, in file order."""
    return list(_entries())


def get_entry(name: str) -> ModelSpec | None:
    """The registry entry called `name` (case-insensitive), or None."""
    entries = _entries()
    key = name.strip().lower()
    return _spec_from_entry(entries[key]) if key in entries else None


def _entry_by_hub_id(hub_id: str) -> ModelSpec | None:
    wanted = hub_id.lower()
    for entry in _entries().values():
        if str(entry.get("hub_id") or "").lower() == wanted:
            spec = _spec_from_entry(entry)
            return replace(spec, kind="hub", hub_id=entry["hub_id"], bundled=False)
        for quant in QUANT_VARIANTS:
            if str(entry.get(f"{quant}_hub_id") or "").lower() == wanted:
                return _spec_from_entry(entry).quantized_variant(quant)
    return None


def _unknown(name: str) -> UsageError:
    close = difflib.get_close_matches(name.lower(), registry_names(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UsageError(
        f"unknown model '{name}'{hint}; run `specexec models` for known names, "
        "or pass a hub id (org/name), a local folder or a .gguf file"
    )


def _resolve_path(path: Path, given: str) -> ModelSpec:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{given} is a file but not a .gguf; pass a model folder or a .gguf file")
        return ModelSpec(name=path.stem, kind="gguf", path=path.resolve())
    if (path / "config.json").is_file():
        return ModelSpec(name=path.resolve().name, kind="local", path=path.resolve())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSpec(name=ggufs[0].stem, kind="gguf", path=ggufs[0].resolve())
    raise UsageError(f"folder {given} holds no config.json (and not exactly one .gguf file)")


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or os.sep in text.strip("/")


def resolve(name_or_path: str) -> ModelSpec:
    """Turn a registry alias, hub id, local folder or .gguf path into a ModelSpec."""
    text = str(name_or_path).strip()
    if not text:
        raise UsageError("empty model name; run `specexec models` for known names")
    spec = get_entry(text)
    if spec is not None:
        return spec
    path = expand_user(text)
    if path.exists():
        return _resolve_path(path, text)
    if HUB_ID.match(text):
        known = _entry_by_hub_id(text)
        return known if known is not None else ModelSpec(name=text, kind="hub", hub_id=text)
    if _looks_like_path(text):
        raise UsageError(f"no such file or folder: {text}")
    raise _unknown(text)


def drafts_for(target: str | ModelSpec) -> list[ModelSpec]:
    """Registry drafts for a target, default draft first; [] for models the registry does not know."""
    spec = target if isinstance(target, ModelSpec) else resolve(target)
    entry = get_entry(spec.name) if spec.in_registry else None
    if entry is None:
        return []
    names = list(entry.drafts)
    if entry.default_draft and entry.default_draft in names:
        names.remove(entry.default_draft)
        names.insert(0, entry.default_draft)
    elif entry.default_draft:
        names.insert(0, entry.default_draft)
    drafts = [get_entry(name) for name in names]
    return [d for d in drafts if d is not None]


# --- what is on this machine ------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from HF_HUB_CACHE / HF_HOME now (not at import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return expand_user(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return expand_user(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _snapshot_has_weights(snapshot: Path) -> bool:
    for index in snapshot.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((snapshot / shard).is_file() for shard in shards)
    return any(p.suffix in WEIGHT_SUFFIXES and p.is_file() for p in snapshot.iterdir())


def hub_cached(hub_id: str) -> bool:
    """True when config and weights of `hub_id` are in the local hub cache (no network used)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(hub_id, "config.json", cache_dir=hub_cache_dir())
    except (ValueError, OSError):
        return False
    if not isinstance(found, str):
        return False
    return _snapshot_has_weights(Path(found).parent)


def available_locally(spec: ModelSpec) -> bool:
    """True when loading `spec` needs no download."""
    if spec.kind == "bundled":
        return bundled.is_installed(spec.name)
    if spec.kind in ("local", "gguf"):
        return spec.path is not None and spec.path.exists()
    return spec.hub_id is not None and hub_cached(spec.hub_id)


def list_models() -> list[dict[str, object]]:
    """One row per registry model with its sizes, drafts and whether it is available locally.

    Keys: name, role, source ("bundled" or "hub"), hub_id, gptq_hub_id, awq_hub_id, w4a16_hub_id,
    params, n_layers,
    hidden_size, layer_bytes_fp16, layer_bytes_4bit, tokenizer_family, default_draft, drafts,
    available_locally, gptq_available_locally, description.
    """
    rows = []
    for name in registry_names():
        spec = get_entry(name)
        rows.append({
            "name": spec.name,
            "role": spec.role,
            "source": spec.kind,
            "hub_id": spec.hub_id,
            "gptq_hub_id": spec.gptq_hub_id,
            "awq_hub_id": spec.awq_hub_id,
            "w4a16_hub_id": spec.w4a16_hub_id,
            "params": spec.params,
            "n_layers": spec.n_layers,
            "hidden_size": spec.hidden_size,
            "layer_bytes_fp16": spec.layer_bytes_fp16(),
            "layer_bytes_4bit": spec.layer_bytes_4bit(),
            "tokenizer_family": spec.tokenizer_family,
            "default_draft": spec.default_draft,
            "drafts": list(spec.drafts),
            "available_locally": available_locally(spec),
            "gptq_available_locally": bool(spec.gptq_hub_id) and hub_cached(spec.gptq_hub_id),
            "description": spec.description,
        })
    return rows
