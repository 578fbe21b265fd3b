"""An input embedding kept in the checkpoint's narrow float dtype, its gathered rows upcast per call.

The input embedding is only gathered (a few rows per pass), never multiplied, so storing a float16
checkpoint's table in float16 while the model computes in float32 (CPUs) halves its memory at no
measurable cost: the upcast rows are exactly the float32 values a float32 copy would hold. A table
tied to the LM head is left alone (the head multiplies with it every pass). For the bundled 1.5B target
this frees 0.47 GB of a capped run for resident layers (docs/benchmarks.md, "Equal memory").
"""

from __future__ import annotations

import torch
from torch import nn


class UpcastEmbedding(nn.Module):
    """An input embedding whose table is stored in a narrow float dtype and whose rows come out in
    `compute_dtype`.

    transformers reads `model.device` and `model.dtype` from the model's first (float) parameter, which
    is the input embedding's: so the module's only parameter is an empty one in the compute dtype on the
    table's device, and the table itself is a buffer."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.compute = nn.Parameter(torch.empty(0, dtype=compute_dtype, device=weight.device),
                                    requires_grad=False)
        self.register_buffer("weight", weight)  # [V, H] in the stored dtype
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.compute_dtype = padding_idx, compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight, self.padding_idx).to(self.compute_dtype)  # [..., H]


def is_tied(model: nn.Module) -> bool:
    """Whether the input embedding and the LM head share their weight (transformers ties them by sharing
    one Parameter; a model skeleton on the meta device is tied the same way)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        return False
    return head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", False))


def input_embedding_name(model: nn.Module) -> str | None:
    """The parameter name of the input embedding's table ('model.embed_tokens.weight')."""
    embed = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embed:
            return f"{name}.weight" if name else "weight"
    return None


def narrow_input_embedding(model: nn.Module, stored: torch.dtype) -> bool:
    """Keep `model`'s input embedding in `stored` (the checkpoint's dtype) when that is a float narrower
    than the model's compute dtype and the table is not tied to the LM head. Converting to `stored` loses
    nothing when the table was loaded from `stored`. Returns whether it did."""
    embed = model.get_input_embeddings()
    if not isinstance(embed, nn.Embedding) or is_tied(model):
        return False
    compute = embed.weight.dtype
    if not stored.is_floating_point or stored.itemsize >= compute.itemsize:
        return False
    narrow = embed.weight.detach().to(stored)
    model.set_input_embeddings(UpcastEmbedding(narrow, compute, embed.padding_idx))
    return True
