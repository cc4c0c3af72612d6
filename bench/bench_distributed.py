"""``python bench/bench_distributed.py``: ROSE under DDP and FSDP2 (rose_kernels/benchmarks/distributed.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rose_kernels.benchmarks.distributed import main  # noqa: E402

if __name__ == "__main__":
    main()
