"""``python bench/bench_clip_step.py``: clip + step against torch (rose_kernels/benchmarks/clip_step.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rose_kernels.benchmarks.clip_step import main  # noqa: E402

if __name__ == "__main__":
    main()
