"""bench/bench_gpu.py (what bench/device_check.sh runs on a GPU) works end to end: run here with the
Triton interpreter on the CPU on a tiny layout. Its times mean nothing; the SELECT routes do: no
guess reads the scores 4 times (window pass, two digit passes, window pass around the found
buckets), the previous call's buckets once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_runs_and_reports_the_select_routes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--layouts", "tiny", "--rounds", "1",
         "--select-elements", "3000", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "gpu-step.json").read_text())
    names = [row["name"] for layout in report["layouts"] for row in layout["rows"]]
    assert "torch AdamW fused" in names and "rose triton second/element" in names, names
    (select,) = report["select"]  # triton only: no CUDA kernels here
    assert select["backend"] == "triton" and select["cold_reads"] == 4.0 and select["guessed_reads"] == 1.0, select
    assert (tmp_path / "gpu-step.md").read_text().startswith("# GPU backends on")
