"""Model sizes the cost model and the memory checks need: a `ModelShape` and bytes per weight for each
quantization the tuner knows."""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per weight for each quantization the tuner knows. 4-bit formats carry per-group scales:
# NF4 (bitsandbytes, blocks of 64, double-quantized absmax) and GPTQ, AWQ and compressed-tensors W4A16
# (groups of 128, 16-bit scales and packed zeros; all run as GPTQ, runtime/qformat.py) land near
# 4.1-4.25 bits.
BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "nf4": 0.53, "gptq": 0.53, "awq": 0.53,
                   "w4a16": 0.53, "int8": 1.03}
# Quantized weights are dequantized to a 16-bit copy before the matmul: written once, read once.
DEQUANT_BYTES_PER_PARAM = {"nf4": 4.0, "gptq": 4.0, "awq": 4.0, "w4a16": 4.0, "int8": 4.0}
# Embeddings and the LM head are not quantized; they stay at this many bytes per weight.
UNQUANTIZED_BYTES = {"fp32": 4.0}


def embedding_bytes_per_param(quantization: str) -> float:
    """Bytes per embedding / LM-head weight: 4 for float32 models, else 2 (kept 16-bit)."""
    return UNQUANTIZED_BYTES.get(quantization, 2.0)


def bytes_per_param(quantization: str) -> float:
    try:
        return BYTES_PER_PARAM[quantization]
    except KeyError:
        raise ValueError(
            f"unknown quantization {quantization!r}; known: {', '.join(BYTES_PER_PARAM)}"
        ) from None


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that the cost model needs."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    mlp_matrices: int = 3  # gated MLP (gate, up, down)
    n_experts: int = 1  # mixture of experts: intermediate_size is per expert
    experts_per_token: int = 1

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """From a transformers PretrainedConfig (Llama, Qwen2, Mistral and alike)."""
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return cls(
            n_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            n_heads=n_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            n_experts=getattr(config, "num_local_experts", None) or 1,
            experts_per_token=getattr(config, "num_experts_per_tok", None) or 1,
        )

    def truncated(self, n_layers: int) -> ModelShape:
        """The shape of an early-exit draft made of the first n_layers layers (same embeddings/head)."""
        if not 1 <= n_layers <= self.n_layers:
            raise ValueError(f"early exit after {n_layers} layers of a {self.n_layers}-layer model")
        return ModelShape(**{**self.__dict__, "n_layers": n_layers})

    def _layer_params(self, experts: int) -> int:
        h, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        q_out = self.n_heads * self.head_dim
        attention = h * q_out + 2 * h * kv + q_out * h
        return attention + self.mlp_matrices * h * self.intermediate_size * experts

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (all experts): what has to be read or streamed."""
        return self._layer_params(self.n_experts)

    @property
    def layer_active_params(self) -> int:
        """Weights one token multiplies with in a layer (its experts only): what costs FLOPs."""
        return self._layer_params(self.experts_per_token)

    @property
    def head_params(self) -> int:
        """Weights of the LM head (read on every forward)."""
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size
        return (
            self.n_layers * self.layer_params + embeddings + (0 if self.tied_embeddings else self.head_params)
        )

    def layer_bytes(self, quantization: str) -> float:
        return self.layer_params * bytes_per_param(quantization)

    def weight_bytes(self, quantization: str) -> float:
        """All weights in memory: decoder layers at the quantized size, embeddings and head unquantized."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.n_layers * self.layer_bytes(quantization) + embed * embedding_bytes_per_param(
            quantization
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

