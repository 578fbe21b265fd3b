"""The server's counters and their Prometheus text (`GET /metrics`).

The speculative counters follow vLLM's `spec_decode_*` ones: drafts (target passes that checked a tree),
draft tokens (tree tokens the target checked) and accepted tokens (tree tokens the target agreed with;
the bonus token of each pass is not counted).
"""

from __future__ import annotations

import threading
from collections import Counter

PREFIX = "specexec"


class Metrics:
    """Thread-safe counters: the HTTP side counts requests, the engine thread counts passes and tokens."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.totals: Counter[str] = Counter()
        self.gauges = {"queue_depth": 0, "active_lanes": 0}

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def add(self, **counts: int) -> None:
        """Add to the named totals (prompt_tokens, generation_tokens, target_passes, draft_passes,
        spec_decode_num_drafts, spec_decode_num_draft_tokens, spec_decode_num_accepted_tokens,
        requests_cancelled, requests_finished, prefill_pieces)."""
        with self._lock:
            self.totals.update(counts)

    def set_gauges(self, queue_depth: int, active_lanes: int) -> None:
        with self._lock:
            self.gauges = {"queue_depth": queue_depth, "active_lanes": active_lanes}

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            requests, totals, gauges = dict(self.requests), dict(self.totals), dict(self.gauges)
        label = f'model="{self.model}"'
        lines = [f"# HELP {PREFIX}_requests_total HTTP requests answered, by endpoint and status.",
                 f"# TYPE {PREFIX}_requests_total counter"]
        for (endpoint, status), count in sorted(requests.items()):
            labels = f'{label},endpoint="{endpoint}",status="{status}"'
            lines.append(f"{PREFIX}_requests_total{{{labels}}} {count}")
        counters = {
            "requests_finished": "Requests whose generation finished (stop or length).",
            "requests_cancelled": "Requests dropped before finishing (client gone, shutdown).",
            "prompt_tokens": "Prompt tokens of finished requests.",
            "generation_tokens": "Tokens generated for finished requests.",
            "target_passes": "Target model passes (each serves every active lane).",
            "draft_passes": "Draft model passes.",
            "spec_decode_num_drafts": "Target passes that checked a draft tree.",
            "spec_decode_num_draft_tokens": "Draft tree tokens checked by the target.",
            "spec_decode_num_accepted_tokens": "Draft tree tokens the target accepted (no bonus tokens).",
            "emitted_tokens": "Tokens emitted by decoding iterations (accepted plus one bonus per lane).",
            "prefill_pieces": "Parts of joining prompts fed beside decoding lanes (chunked prefill).",
        }
        for name, text in counters.items():
            lines += [f"# HELP {PREFIX}_{name}_total {text}", f"# TYPE {PREFIX}_{name}_total counter",
                      f"{PREFIX}_{name}_total{{{label}}} {totals.get(name, 0)}"]
        passes = totals.get("target_passes", 0)
        per_pass = totals.get("emitted_tokens", 0) / passes if passes else 0.0
        lines += [f"# HELP {PREFIX}_tokens_per_target_pass Emitted tokens per target pass since start.",
                  f"# TYPE {PREFIX}_tokens_per_target_pass gauge",
                  f"{PREFIX}_tokens_per_target_pass{{{label}}} {per_pass:.6g}"]
        for name, text in (("queue_depth", "Requests waiting for a lane."),
                           ("active_lanes", "Requests decoding now.")):
            lines += [f"# HELP {PREFIX}_{name} {text}", f"# TYPE {PREFIX}_{name} gauge",
                      f"{PREFIX}_{name}{{{label}}} {gauges[name]}"]
        return "\n".join(lines) + "\n"
