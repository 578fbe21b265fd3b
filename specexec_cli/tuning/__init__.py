"""Cost model and Optuna search that choose the fastest configuration for a machine."""
