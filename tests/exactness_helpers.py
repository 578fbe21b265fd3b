"""Greedy exactness in 16-bit arithmetic, up to near-ties (the guarantee of docs/algorithm.md, "Exactness
in 16-bit").

In float32/64 a tree pass and a one-token pass give the same argmax, so speculative output equals plain
decoding token for token. In bf16/fp16 the two passes round differently (other matmul shapes, another
reduction order), so where plain decoding's best two logits are closer than the rounding difference,
either token may come out. The check therefore walks the candidate output along plain decoding:

- plain decoding (`greedy_reference`: one pass over the prefix, then one token per pass through the
  KV cache, exactly as AutoregressiveDecoder) runs from the prompt;
- at the first step where the candidate differs, plain decoding's relative top-2 margin there,
  (l1 - l2) / max(1, |l1|) for its best two logits l1 >= l2, must be below `epsilon`, else the check
  fails (`near_tie_epsilon(dtype)` is the documented bound: 8 machine epsilons of the dtype);
- plain decoding then restarts from the committed prefix (prompt + candidate up to and including the
  differing token) and the walk goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specexec_cli.decoding.forward import causal_pattern, forward, new_cache

# (prefix token ids, n) -> (n greedy tokens, relative top-2 margin at each of those steps)
Reference = Callable[[list[int], int], tuple[list[int], list[float]]]
NEAR_TIE_EPS = 8  # machine epsilons


def near_tie_epsilon(dtype: torch.dtype) -> float:
    """The relative margin below which 16-bit rounding may flip the argmax: bf16 2**-4, fp16 2**-7
    (and 0 for float32/64, where the output must be exact)."""
    if dtype in (torch.float32, torch.float64):
        return 0.0
    return NEAR_TIE_EPS * torch.finfo(dtype).eps


def relative_margin(logits: torch.Tensor) -> float:
    """(l1 - l2) / max(1, |l1|) for the best two entries l1 >= l2 of logits [V]."""
    top = torch.topk(logits.float(), 2).values
    return float((top[0] - top[1]) / top[0].abs().clamp(min=1.0))


@dataclass
class NearTieReport:
    """Outcome of `compare_near_ties`."""

    ok: bool
    near_ties: list[int] = field(default_factory=list)  # steps where a near-tie let the output differ
    failure: str | None = None  # why not ok: the step, the tokens and the margin
    restarts: int = 0


def greedy_reference(model: torch.nn.Module) -> Reference:
    """Plain greedy decoding of `model` that also reports the relative top-2 margin of every step."""

    @torch.inference_mode()
    def run(prefix: list[int], n: int) -> tuple[list[int], list[float]]:
        device = model.device
        ids = torch.tensor(prefix, dtype=torch.long, device=device)
        cache, tokens, margins = new_cache(), [], []
        past = 0
        for _ in range(n):
            new = ids[past:]
            positions = torch.arange(past, ids.numel(), device=device)
            attend = causal_pattern(past, new.numel(), device)
            logits = forward(model, cache, new, positions, attend, keep=1)[-1]  # [V]
            token = int(logits.argmax())
            tokens.append(token)
            margins.append(relative_margin(logits))
            past = ids.numel()
            ids = torch.cat([ids, torch.tensor([token], device=device)])
        return tokens, margins

    return run


def compare_near_ties(reference: Reference, prompt: list[int], candidate: list[int],
                      epsilon: float) -> NearTieReport:
    """Does `candidate` (tokens generated after `prompt`) equal plain decoding except at near-ties
    (relative top-2 margin < epsilon), restarting plain decoding from the committed prefix after each?"""
    report = NearTieReport(ok=True)
    pos = 0
    while pos < len(candidate):
        tokens, margins = reference(prompt + candidate[:pos], len(candidate) - pos)
        differ = next((k for k, (a, b) in enumerate(zip(tokens, candidate[pos:], strict=True)) if a != b),
                      None)
        if differ is None:
            return report
        step = pos + differ
        if margins[differ] >= epsilon:
            report.ok = False
            report.failure = (f"step {step}: plain decoding gives {tokens[differ]}, the candidate "
                              f"{candidate[step]}, and the relative top-2 margin {margins[differ]:.4g} "
                              f">= {epsilon}")
            return report
        report.near_ties.append(step)
        report.restarts += 1
        pos = step + 1
    return report
