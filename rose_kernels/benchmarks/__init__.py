"""Benchmarks behind ``rose-bench`` (cli.py) and ``bench/``: the optimizer step (step.py), SELECT
against torch and numpy (select.py), peak memory per parameter (memory.py), step time against the
parameter count (scaling.py). Every comparison is timed in one process, round-robin, and reported as
medians with min/max and as ratios to a baseline measured in the same run."""
