"""An int8 draft for CPUs: less than half the memory of float32 and faster, through fbgemm's int8 GEMM.

`quantize_draft_int8(model)` replaces the `nn.Linear`s (the decoder layers' projections and the LM head)
with `Int8Linear`s and the input embedding with an `Int8Embedding`. Weights are quantized once,
symmetrically per output row (scale = max |w| / 127); activations are quantized per call, one scale per
call, by torch's dynamic int8 linear (`quantized::linear_dynamic`, fbgemm on x86), which accumulates in
int32 and returns float32. On the 2-core AVX2 box a [16, 896] x [896, 4864] product took 0.26 ms
against 1.32 ms in float32, and the 0.5B draft's LM head at 16 rows 11 ms against 76 ms
(scripts/bench_int8_draft.py).

The MLP's down projection stays in float32: its input, SiLU(gate) * up, has outliers that one
activation scale per call cannot hold (on code, the 0.5B draft's top-1 agreement with its float32 self
was 0.84 with it in int8, 0.94 without; docs/benchmarks.md, "Equal memory and equal streaming").

Only for drafts: it changes the draft's numbers, so its proposals and the acceptance rate, never the
target's output (every emitted token is still the target's own). A tied embedding gathers the same
int8 rows and scales the LM head computes with. The packed weights live outside the module's
parameters and buffers; `packed_bytes(model)` reports them for the memory plan.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

INT8_DEVICES = ("cpu",)
FLOAT_LINEARS = ("down_proj", "w2")  # MLP down projections (Llama/Qwen/Mistral, Mixtral experts)


def available() -> bool:
    """Whether this torch build has the dynamic int8 linear (fbgemm / onednn / qnnpack)."""
    try:
        engines = torch.backends.quantized.supported_engines
        return hasattr(torch.ops.quantized, "linear_dynamic") and bool(engines)
    except (AttributeError, RuntimeError):
        return False


def _row_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [rows, cols] -> (int8 [rows, cols], float32 scales [rows]): w ~= q * scale, |q| <= 127."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [rows]
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def _pack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed form of a per-row int8 weight (and float bias) for quantized::linear_dynamic."""
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensor creation deprecated; the kernel is not
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights: y = dynamic_int8(x) @ (q * scale).T + bias, in float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = _row_quantize(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self._packed = _pack(q, scales, bias)
        self.packed_bytes = q.numel() + scales.numel() * 12 + (0 if bias is None else bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()  # [T, in]
        y = torch.ops.quantized.linear_dynamic(flat, self._packed, reduce_range=False)  # [T, out]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """An embedding table of int8 rows with one float32 scale per row (the same rows an int8 LM head
    tied to it computes with)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 padding_idx: int | None) -> None:
        super().__init__()
        self.register_buffer("rows", q, persistent=False)  # int8 [V, H]
        self.register_buffer("scales", scales, persistent=False)  # float32 [V]
        self.dtype, self.padding_idx = dtype, padding_idx
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.rows).float()  # [..., H]
        return (rows * self.scales[ids].unsqueeze(-1)).to(self.dtype)


def quantize_draft_int8(model: nn.Module) -> nn.Module:
    """Replace `model`'s linears and input embedding in place with int8 ones (see the module docstring);
    returns the model. The model must be on a CPU in a float dtype."""
    if not available():
        raise RuntimeError("this torch build has no dynamic int8 linear (quantized::linear_dynamic)")
    if model.device.type not in INT8_DEVICES:
        raise ValueError(f"an int8 draft runs on a CPU; this draft is on {model.device}")
    embed = model.get_input_embeddings()
    q, scales = _row_quantize(embed.weight)
    model.set_input_embeddings(Int8Embedding(q, scales, embed.weight.dtype, embed.padding_idx))
    # a tied LM head quantizes the same weight, so it computes with the rows the embedding gathers
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in FLOAT_LINEARS:
                setattr(module, child_name, Int8Linear(child))
    model.config.tie_word_embeddings = False  # nothing is tied any more: keep transformers from re-tying
    model.int8_draft = True
    return model


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the int8 linears' packed weights (held outside parameters and buffers)."""
    return sum(getattr(m, "packed_bytes", 0) for m in model.modules())
