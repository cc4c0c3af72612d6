"""``python bench/bench_train_step.py``: the trainer-step benchmark (rose_kernels/benchmarks/train_step.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rose_kernels.benchmarks.train_step import main  # noqa: E402

if __name__ == "__main__":
    main()
