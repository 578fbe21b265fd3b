"""Decoding benchmark on the bundled pair: SpecExec and SpecInfer across budgets, autoregressive decoding
and transformers' assisted generation, one markdown table per temperature (same as `specexec bench`).

Examples:
  python scripts/bench.py                                      # 8 MT-Bench prompts, t=0 and 0.6
  python scripts/bench.py --n-prompts 4 --budgets 16,64,256 --temperature 0 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
