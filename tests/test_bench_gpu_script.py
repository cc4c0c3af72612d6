"""bench/bench_gpu.py (what bench/device_check.sh runs on a GPU) works end to end: run here with the
Triton interpreter on the CPU on a tiny layout. Its times mean nothing; the SELECT routes do: no
guess reads the scores 4 times (window pass, two digit passes, window pass around the found
buckets), the previous call's buckets once.

The rest runs the script in this process (its module loaded from bench/bench_gpu.py, the costly
parts replaced where a test is about the bookkeeping around them): what does not fit the memory is
skipped or shrunk with its reason, the report is on disk after every configuration, a configuration
that raises is an error row (exit status 1) and the next one runs, an interrupted run keeps its rows
and says so, and the report's files are replaced atomically with no temporary file left behind."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_gpu.py"
TINY = ["--device", "cpu", "--layouts", "tiny", "--rounds", "1"]


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


# ------------------------------------------------------------------------------------------------
# in-process: the module itself
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bg():
    """bench/bench_gpu.py as a module (sys.path as it was: the script puts the checkout first)."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def _numel(bg, layout: str) -> int:
    return sum(math.prod(shape) for _, shape in bg.bench_step.layout_shapes(layout))


def _report(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu-step.json").read_text()), (out / "gpu-step.md").read_text()


def _no_temp_files(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["gpu-step.json", "gpu-step.md"], list(out.iterdir())


def _must_not_run(*args, **kwargs):
    raise AssertionError("ran although it does not fit the memory budget")


def test_plan_select_runs_all_shrinks_to_a_one_digit_count_or_skips(bg):
    gib = bg.GIB
    assert bg.plan_select(10**9, None) == (10**9, None)  # no limit known
    assert bg.plan_select(10**9, bg.select_bytes(10**9)) == (10**9, None)  # exactly fits
    n, note = bg.plan_select(10**9, 2 * gib)
    assert n == 10**8 and note.startswith("shrunk from 1e+09 to 1e+08 elements: 1e+09 elements need "), note
    assert note.endswith("GiB (estimate), 2.0 GiB free"), note
    for free_gib in (1.2, 1.5, 2.0, 3.3, 7.9, 40.0, 77.5):
        free = int(free_gib * gib)
        n, note = bg.plan_select(10**11, free)
        assert n >= bg.MIN_SELECT_ELEMENTS and note.startswith("shrunk"), (free_gib, n, note)
        digits = str(n).rstrip("0")
        assert len(digits) == 1, (free_gib, n)  # one significant digit: 3e8, not 3.27e8
        scale = n // int(digits)
        assert bg.select_bytes(n) <= free < bg.select_bytes(n + scale), (free_gib, n)  # the largest that fits
    # What fits is under a million scores (or nothing): skipped, with needed vs free.
    assert bg.plan_select(10**9, gib) == (0, f"skipped: 1e+09 elements need {bg.gib(bg.select_bytes(10**9))} "
                                             "(estimate), 1.0 GiB free")
    n, note = bg.plan_select(10**9, (bg.SELECT_CONSTANT + bg.select_bytes(bg.MIN_SELECT_ELEMENTS)) // 2)  # 5e5 fit
    assert n == 0 and note.startswith("skipped: 1e+09 elements need"), note
    n, note = bg.plan_select(3000, gib // 2)  # a small request that does not fit either
    assert n == 0 and note == "skipped: 3e+03 elements need 1.0 GiB (estimate), 0.5 GiB free", note
    assert bg.plan_select(3000, bg.select_bytes(3000)) == (3000, None)  # a small one that fits runs as asked


def test_layout_bytes_and_the_default_layouts_on_an_h100(bg):
    assert bg.layout_bytes(0) == bg.LAYOUT_CONSTANT
    sizes = [10**3, 10**6, 3 * 10**8, 10**9, 13 * 10**8]
    assert [bg.layout_bytes(n) for n in sizes] == sorted(bg.layout_bytes(n) for n in sizes)
    for n in sizes:  # at least the float32 tensors of one pairing (see LAYOUT_BYTES_PER_ELEMENT)
        assert bg.layout_bytes(n) >= 40 * n + bg.LAYOUT_CONSTANT, n
    # The defaults must fit an H100 (80 GB: ~78 GiB free), else the device check skips them.
    h100_free = 78 * bg.GIB
    for layout in ("bert-large", "1.3b"):
        assert bg.layout_bytes(_numel(bg, layout)) < h100_free, (layout, bg.gib(bg.layout_bytes(_numel(bg, layout))))
    assert bg.plan_select(10**9, h100_free) == (10**9, None)
    # The 1.3B layout does not fit half of one (e.g. an A100 40 GB): it is skipped there, not run into an OOM.
    assert bg.layout_bytes(_numel(bg, "1.3b")) > 40 * bg.GIB


def test_free_memory_sources(bg):
    import torch

    assert bg.free_memory(torch.device("cpu"), 0.5) == (bg.GIB // 2, "--memory-budget-gib")
    free, source = bg.free_memory(torch.device("cpu"), None)
    if Path("/proc/meminfo").is_file():
        assert source == "MemAvailable (/proc/meminfo)" and free > 0, (free, source)


def test_what_does_not_fit_the_budget_is_skipped_with_the_reason(bg, tmp_path, monkeypatch):
    monkeypatch.setattr(bg, "bench_config", _must_not_run)
    monkeypatch.setattr(bg, "bench_select", _must_not_run)
    rc = bg.cli([*TINY, "--select-elements", "3000", "--backends", "triton", "--memory-budget-gib", "0.5",
                 "--out", str(tmp_path)])
    assert rc == 0  # a skip is no error
    report, md = _report(tmp_path)
    assert report["state"] == "done" and report["errors"] == [], report
    (layout,) = report["layouts"]
    need = bg.gib(bg.layout_bytes(_numel(bg, "tiny")))
    why = f"needs {need} (estimate), 0.5 GiB free (--memory-budget-gib)"
    assert layout["skipped"] == why and layout["rows"] == [], layout
    assert layout["free_gib"] == 0.5 and layout["needed_gib"] > 0.5, layout
    (select,) = report["select"]
    select_why = "skipped: 3e+03 elements need 1.0 GiB (estimate), 0.5 GiB free (--memory-budget-gib)"
    assert select["elements"] == 0 and select["requested"] == 3000 and select["skipped"] == select_why, select
    assert report["skipped"] == [f"layout tiny: {why}", f"select: {select_why}"], report["skipped"]
    # The markdown says the same where each section is.
    assert "\n## tiny: " in md and f": skipped\n\nSkipped: {why}.\n" in md, md
    assert f"## SELECT (triton)\n\nMemory: {select_why}.\n" in md, md
    assert f"## Skipped\n\n- layout tiny: {why}\n- select: {select_why}\n" in md, md
    _no_temp_files(tmp_path)


def test_select_is_shrunk_to_what_fits(bg, tmp_path, monkeypatch):
    calls = []

    def fake_select(elements, rounds, device, backend="triton"):
        calls.append((elements, backend))
        return dict(backend=backend, elements=elements, read_ms=1.0, target=4.0, cold_ms=3.0, cold_ratio=3.0,
                    cold_reads=4.0, guessed_ms=1.5, guessed_ratio=1.5, guessed_reads=1.0)

    monkeypatch.setattr(bg, "bench_select", fake_select)
    monkeypatch.setattr(bg, "bench_config", _must_not_run)  # tiny needs more than this budget too
    budget = bg.select_bytes(10**8) / bg.GIB  # 1e8 scores fit, 2e8 do not (nor the tiny layout)
    rc = bg.cli([*TINY, "--select-elements", "1e9", "--backends", "triton", "--memory-budget-gib", repr(budget),
                 "--out", str(tmp_path)])
    assert rc == 0
    assert calls == [(10**8, "triton")], calls
    report, md = _report(tmp_path)
    (select,) = report["select"]
    assert select["elements"] == 10**8 and select["requested"] == 10**9, select
    assert select["note"].startswith("shrunk from 1e+09 to 1e+08 elements: 1e+09 elements need "), select
    assert select["note"].endswith(" GiB free (--memory-budget-gib)"), select
    assert f"Memory: {select['note']}." in md and "Two exact thresholds of 1e+08 float32 scores" in md, md
    _no_temp_files(tmp_path)


def test_a_raising_configuration_is_an_error_row_and_the_next_ones_run(bg, tmp_path, monkeypatch):
    """The report is on disk, json and markdown, with the rows so far when each configuration
    starts; an injected out-of-memory error (first line kept) and a real one (an unknown backend)
    are rows; the configuration between them runs; the exit status is 1."""
    real = bg.bench_config
    seen = []

    def flaky(cfg, data, rounds, timer):
        report, md = _report(tmp_path)
        rows = [row["name"] for layout in report["layouts"] for row in layout["rows"]]
        seen.append((cfg[0], rows, report["state"], [name for name in rows if f"| {name} |" in md]))
        if cfg[0] == "torch AdamW fused":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nthe allocator's long advice")
        return real(cfg, data, rounds, timer)

    monkeypatch.setattr(bg, "bench_config", flaky)
    rc = bg.cli([*TINY, "--select-elements", "0", "--backends", "bogus", "--configs", "fused,foreach,bogus off",
                 "--out", str(tmp_path)])
    assert rc == 1
    fused, foreach, bogus = "torch AdamW fused", "torch AdamW foreach", "rose bogus off"
    assert seen == [(fused, [], "running", []), (foreach, [fused], "running", [fused]),
                    (bogus, [fused, foreach], "running", [fused, foreach])], seen
    report, md = _report(tmp_path)
    assert report["state"] == "done", report["state"]
    (layout,) = report["layouts"]
    first, second, third = layout["rows"]
    assert first == dict(name=fused, error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB",
                         target=None), first
    assert "error" not in second and second["name"] == foreach and second["median_ms"] > 0, second
    assert second["ratio"] > 0 and second["rounds"] == 1, second
    assert third["name"] == bogus and third["error"].startswith("ValueError: unknown backend 'bogus'"), third
    assert report["errors"] == [f"tiny / {fused}: {first['error']}", f"tiny / {bogus}: {third['error']}"], report
    assert f"| {fused} | error: `RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB` |" in md, md
    assert f"| {foreach} | " in md and "## Errors" in md and "allocator's long advice" not in md, md
    assert report["skipped"] == ["select: --select-elements 0"], report["skipped"]
    _no_temp_files(tmp_path)


def test_an_interrupted_run_keeps_its_rows_and_says_so(bg, tmp_path, monkeypatch):
    """SIGTERM (what `timeout` sends at the stage's cap) mid-run: the rows so far stay on disk, the
    report says it was interrupted, the exit status is 128 + SIGTERM, the handler is put back."""
    before = signal.getsignal(signal.SIGTERM)
    real = bg.bench_config
    handlers = []

    def cut(cfg, data, rounds, timer):
        handlers.append(signal.getsignal(signal.SIGTERM))
        if cfg[0] == "torch AdamW foreach":
            bg._on_sigterm(signal.SIGTERM, None)  # what the signal runs (no real signal to pytest itself)
        return real(cfg, data, rounds, timer)

    monkeypatch.setattr(bg, "bench_config", cut)
    with pytest.raises(SystemExit) as exit_info:
        bg.cli([*TINY, "--select-elements", "3000", "--configs", "fused,foreach,off", "--backends", "triton",
                "--out", str(tmp_path)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert handlers == [bg._on_sigterm] * 2 and signal.getsignal(signal.SIGTERM) == before, handlers
    report, md = _report(tmp_path)
    assert report["state"] == "interrupted (SIGTERM)" and report["select"] == [], report
    assert [row["name"] for row in report["layouts"][0]["rows"]] == ["torch AdamW fused"], report
    assert "**Partial report** (interrupted (SIGTERM))" in md, md
    _no_temp_files(tmp_path)


def test_write_atomic_replaces_whole_files_and_leaves_no_temp_file(bg, tmp_path, monkeypatch):
    path = tmp_path / "gpu-step.json"
    bg.write_atomic(path, "old")
    bg.write_atomic(path, "new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(bg.os, "replace", spy)
    bg.write_atomic(path, "newer")
    ((src, dst),) = replaced
    assert dst == path and src.parent == path.parent and src != path  # same directory: os.replace is atomic
    monkeypatch.undo()

    def replace_fails(src, dst):
        raise OSError("EXDEV, or the process is killed here")

    monkeypatch.setattr(bg.os, "replace", replace_fails)
    with pytest.raises(OSError, match="EXDEV"):
        bg.write_atomic(path, "lost")
    monkeypatch.undo()
    assert path.read_text() == "newer" and list(tmp_path.iterdir()) == [path]

    def half_written(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:2])
        raise OSError("No space left on device")

    monkeypatch.setattr(bg.Path, "write_text", half_written)
    with pytest.raises(OSError, match="No space"):
        bg.write_atomic(path, "truncated")
    monkeypatch.undo()
    assert path.read_text() == "newer" and list(tmp_path.iterdir()) == [path]
