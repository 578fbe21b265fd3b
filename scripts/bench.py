"""Decoding benchmark on the bundled pair: `specexec bench` itself (one command line, one set of flags),
runnable from a checkout without installing the console script.

Examples:
  python scripts/bench.py                                      # 8 MT-Bench prompts, t=0 and 0.6
  python scripts/bench.py --n-prompts 4 --budgets 16,64,256 --temperature 0 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specexec_cli.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="scripts/bench.py")
