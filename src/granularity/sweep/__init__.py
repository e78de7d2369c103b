"""Hyperparameter sweeps with Optuna: search spaces, the shared storage, the trial objective and the sweep runner."""
