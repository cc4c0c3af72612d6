"""The prose stays true of the tree: the layout in docs/architecture.md names every file of the
package, csrc/ and tools/ (and no other), README.md stays short, and the package has no import cycle."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _layout_paths() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths, stack = set(), []  # stack: (indent, directory)
    for line in block.splitlines():
        match = re.match(r"^    ( *)(\S+)", line)
        if not match or not re.fullmatch(r"[\w.\-]+/?", match.group(2)):
            continue
        indent, name = len(match.group(1)), match.group(2)
        if indent % 2:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(d for _, d in stack) + name
        if name.endswith("/"):
            stack.append((indent, name))
        paths.add(path)
    return paths


def _tracked(*roots: str) -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files", *roots], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout: {e}")
    return set(out.stdout.split())


def test_architecture_layout_matches_the_tree():
    documented = _layout_paths()
    tracked = _tracked("rose_kernels", "csrc", "tools")
    files = {p for p in documented if not p.endswith("/")}
    missing = sorted(tracked - files)
    stale = sorted(p for p in files if p.split("/")[0] in ("rose_kernels", "csrc", "tools") and p not in tracked)
    assert not missing, f"docs/architecture.md's layout lacks {missing}"
    assert not stale, f"docs/architecture.md's layout names files that do not exist: {stale}"


def test_readme_is_at_most_10_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= 10 * 1024, f"README.md is {size} bytes"


def test_no_import_cycle_in_the_package():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "import_cycles.py"), "rose_kernels"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
