"""``python -m rose_kernels.train``: the same as ``rose-train``."""

import sys

from rose_kernels.train.cli import train_main

sys.exit(train_main())
