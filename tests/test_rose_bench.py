"""`rose-bench` end to end on tiny sizes: the files it promises, with machine, versions and revision."""

from __future__ import annotations

import json

from rose_kernels.benchmarks import cli


def test_rose_bench_select_and_scaling_write_results(tmp_path, capsys):
    assert cli.main(["--suites", "select,scaling", "--sizes", "20000,200000", "--rounds", "1", "--out",
                     str(tmp_path)]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    for suite in ("select", "scaling"):
        assert any(f.startswith(f"{suite}-cpu-") and f.endswith(".md") for f in files), files
        assert any(f.startswith(f"{suite}-cpu-") and f.endswith(".json") for f in files), files
    png = next(tmp_path.glob("scaling-cpu-*.png"))
    assert png.read_bytes().startswith(b"\x89PNG")
    report = json.loads(next(tmp_path.glob("select-cpu-*.json")).read_text())
    assert {"git", "torch", "date", "cpu"} <= set(report["machine"])
    sizes = report["sizes"]
    assert [s["n"] for s in sizes] == [20000, 200000]
    for entry in sizes:
        ours = entry["methods"]["rose_kernels"]
        assert ours["rounds"] == 1 and ours["median"] > 0
        assert "vs_rose_kernels" in entry["methods"]["2 x torch.kthvalue"]
    text = next(tmp_path.glob("select-cpu-*.md")).read_text()
    assert "torch " in text and "git " in text and "| n |" in text
