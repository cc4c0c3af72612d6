"""bench/device_check.sh, the one-shot GPU check, works before it meets a GPU: its dry run (CPU
stand-ins for every stage) ends with exit 0 and leaves every stage's file and the summary, its caps fit
the lease, and the per-test time limit it relies on (ROSE_TEST_TIMEOUT, tests/conftest.py) fails a
test that runs past it and lets the next one run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
STAGES = ["env", "build", "install", "tests-cuda", "tests-triton", "tests-heavy", "bench"]
FILES = ["env.txt", "build.txt", "tests.txt", "bench.txt", "gpu-step.md", "gpu-step.json", "summary.md"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")
needs_alarm = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no SIGALRM here")


def _caps(**env) -> dict[str, int]:
    run = subprocess.run(["bash", str(SCRIPT), "--print-caps"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return {" ".join(words[:-1]): int(words[-1]) for words in map(str.split, run.stdout.splitlines())}


@needs_bash
def test_script_parses_and_its_caps_fit_the_lease():
    syntax = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    caps = _caps()
    stage_caps = {k.removeprefix("cap "): v for k, v in caps.items() if k.startswith("cap ")}
    assert list(stage_caps) == STAGES
    assert caps["total"] == sum(stage_caps.values()) <= 480, caps
    # The sanitizer's own limit and each per-test limit lie inside their stage's cap.
    assert 0 < caps["sanitizer"] < stage_caps["tests-heavy"], caps
    for stage in ("tests-cuda", "tests-triton", "tests-heavy"):
        assert 0 < caps[f"per-test {stage}"] < stage_caps[stage], (stage, caps)
    assert caps["per-test tests-heavy"] > caps["sanitizer"], "the sanitizer's message should come first"
    # Each cap follows its variable.
    assert _caps(BENCH_TIMEOUT="33", TESTS_HEAVY_TIMEOUT="90")["cap bench"] == 33
    assert _caps(TESTS_HEAVY_TIMEOUT="90")["sanitizer"] == 55
    assert _caps(ROSE_SANITIZER_TIMEOUT="12")["sanitizer"] == 12


@needs_bash
@pytest.mark.slow
def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "ROSE_GIT_REV": "dry-test"}
    env.pop("DEVICE_CHECK_DRY", None)
    built = sorted((p.name, p.stat().st_mtime_ns) for p in (ROOT / "rose_kernels").glob("_C*.so"))
    started = time.monotonic()
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=540, cwd=tmp_path)
    took = time.monotonic() - started
    # The dry run builds nothing: the in-place extension, loaded by this very process, is untouched.
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (ROOT / "rose_kernels").glob("_C*.so")) == built
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, log
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing\n{log}"
    assert len(list(out.iterdir())) <= 8, sorted(p.name for p in out.iterdir())  # what comes back
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "git dry-test" in summary, summary
    for stage in STAGES:
        row = re.search(rf"^\| {re.escape(stage)} \| (\d+)[^|]* \| (\d+) s \| (\d+) s \|", summary, re.M)
        assert row, f"{stage} not in the summary\n{summary}"
        rc = int(row.group(1))
        assert rc == 0 or (rc == 5 and stage in ("tests-cuda", "tests-heavy")), f"{stage}: exit {rc}\n{summary}"
    assert "not run" not in summary and "running since" not in summary, summary
    assert "dry run: stand-in for 'ROSE_KERNELS_CUDA=1" in (out / "build.txt").read_text()
    env_txt = (out / "env.txt").read_text()
    assert re.search(r"^setuptools \d+", env_txt, re.M), env_txt
    assert re.search(r"^CUDA_HOME=/\S+", env_txt, re.M), env_txt
    assert "nvidia-smi: dry run" in env_txt, env_txt
    tests = (out / "tests.txt").read_text()
    for stage in ("tests-cuda", "tests-triton", "tests-heavy"):
        assert f"===== {stage} " in tests and f"{stage}: exit " in tests, tests[-3000:]
    assert re.search(r"tests-triton: exit 0 ", tests) and " passed" in tests, tests[-3000:]
    # Every pytest goes on past a file that does not import, and none stops at the first failures.
    starts = re.findall(r"^===== tests-\S+ .*$", tests, re.M)
    assert len(starts) == 3 and all("--continue-on-collection-errors" in line and "-rfEs" in line
                                    and "--maxfail" not in line and " -x " not in line for line in starts), starts
    assert "tests/test_op_family.py" in starts[0] and re.search(r"test_op_family\.py::\S+ PASSED", tests), starts
    assert "rose triton second/element" in (out / "gpu-step.md").read_text()
    print(f"dry run: {took:.0f} s")


# ------------------------------------------------------------------------------------------------
# ROSE_TEST_TIMEOUT (tests/conftest.py), in a pytest of its own over a generated file
# ------------------------------------------------------------------------------------------------

_TIMED = """
import os, signal, time

def test_a_sleeps_past_the_limit():
    try:
        time.sleep(60)
    except Exception:  # the limit is no Exception: a broad except cannot swallow it
        pass

def test_b_runs_after_it():
    assert signal.getitimer(signal.ITIMER_REAL)[0] > 0  # armed for this test too

def test_c_gets_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` at a stage's cap
    time.sleep(30)

def test_d_never_runs():
    pass
"""

_UNTIMED = """
import signal

def test_no_timer_without_the_variable():
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
"""


def _pytest_with_conftest(tmp_path: Path, source: str, **env) -> subprocess.CompletedProcess:
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(source))
    full_env = {k: v for k, v in os.environ.items() if k != "ROSE_TEST_TIMEOUT"}
    full_env.update(env, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-p", "conftest",
         "--rootdir", str(tmp_path), "test_generated.py"],
        env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )


@needs_alarm
def test_per_test_timeout_fails_the_test_and_the_session_goes_on(tmp_path):
    started = time.monotonic()
    run = _pytest_with_conftest(tmp_path, _TIMED, ROSE_TEST_TIMEOUT="1.5")
    took = time.monotonic() - started
    out = run.stdout + run.stderr
    assert run.returncode == 2, out  # interrupted by the SIGTERM, after a failure and a pass
    assert "ran past 1.5 s (ROSE_TEST_TIMEOUT): test_generated.py::test_a_sleeps_past_the_limit" in out, out
    assert re.search(r"test_b_runs_after_it PASSED", out), out
    assert "FAILED test_generated.py::test_a_sleeps_past_the_limit" in out, out  # pytest's summary still printed
    assert "KeyboardInterrupt" in out and "SIGTERM" in out, out
    assert "test_d_never_runs" not in out, out
    assert re.search(r"1 failed, 1 passed", out), out
    assert took < 60, f"{took:.0f} s: the limit did not cut the 60 s sleep"


@needs_alarm
def test_per_test_timeout_is_off_without_the_variable(tmp_path):
    run = _pytest_with_conftest(tmp_path, _UNTIMED)
    assert run.returncode == 0, run.stdout + run.stderr
