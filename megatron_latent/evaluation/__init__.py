"""Evaluation: the lm-eval backend, multiple-choice metrics, offline tasks, checkpoint sweeps
and the loss-perspective analysis (docs/evaluation.md)."""
