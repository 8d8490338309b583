"""Tactic selection: the autotuner and its timing cache."""
