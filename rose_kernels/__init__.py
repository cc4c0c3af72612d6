"""rose_kernels: robust selective fine-tuning (ROSE) at the cost of a fused AdamW step."""

__version__ = "0.1.0"

from rose_kernels import distributed  # noqa: E402,F401  (rose_kernels.distributed.average_gradients_)
from rose_kernels.clip import clip_grad_norm_  # noqa: E402
from rose_kernels.groups import is_eligible, rose_param_groups  # noqa: E402
from rose_kernels.optim import RoseAdamW  # noqa: E402

__all__ = ["RoseAdamW", "clip_grad_norm_", "rose_param_groups", "is_eligible", "__version__"]
