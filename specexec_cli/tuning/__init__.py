"""Cost model and Optuna search that choose the fastest configuration for a machine.

cost model: shape.py, cost_model.py, memory.py | search: space.py, study.py, search.py, results.py |
measurement: pool.py, objective.py, measure.py, calibration.py, prompt_set.py, batch_workload.py,
batch_stage.py | orchestration: tune.py, profile_out.py (presets.py: starting profiles from the cost
model alone).
"""

import sys


def log(message: str) -> None:
    print(f"specexec: {message}", file=sys.stderr, flush=True)
