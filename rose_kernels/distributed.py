"""ROSE under ``torch.distributed`` data parallelism (DDP).

Under ``DistributedDataParallel`` every rank holds the whole model, and DDP averages the gradients
of each backward pass across ranks, so ``RoseAdamW.step()`` scores the same averaged gradients on
every rank and keeps identical masks: nothing ROSE-specific is needed for ``off`` and ``second``.

The two-pass modes (``first``, ``ensemble``) differ: a training step backpropagates twice through
one forward pass (the KL loss with ``retain_graph=True``, then the task loss), and DDP synchronises
only one backward pass per forward. :func:`average_gradients_` is the explicit all-reduce for that
case: run the forward pass under ``model.no_sync()``, and average the gradients by hand after each
backward pass::

    with ddp_model.no_sync():                      # the forward pass too: DDP decides there
        logits, kl = forward_twice(ddp_model, batch)
        kl.backward(retain_graph=True)
        rose_kernels.distributed.average_gradients_(params)   # the KL gradients, averaged
        opt.record_first_order()                   # scores the global KL gradient
        opt.zero_grad()
        task_loss(logits, batch).backward()
        rose_kernels.distributed.average_gradients_(params)   # the task gradients, averaged
    opt.step()

Every rank then scores and updates with exactly what a single process would see for the global
batch (equal-sized local batches, losses averaged over each local batch), so the masks match.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def average_gradients_(params, group: dist.ProcessGroup | None = None, bucket_bytes: int = 32 << 20) -> None:
    """Replaces every ``.grad`` of ``params`` by its mean over the ranks of ``group``, in place.

    Parameters without a gradient are skipped, so every rank must have gradients for the same
    parameters (see :func:`average_tensors_`)."""
    average_tensors_([p.grad for p in params if p.grad is not None], group, bucket_bytes)


def average_tensors_(tensors, group: dist.ProcessGroup | None = None, bucket_bytes: int = 32 << 20) -> None:
    """Replaces every tensor of ``tensors`` by its mean over the ranks of ``group``, in place.

    The tensors are flattened into buckets of at most ``bucket_bytes`` per dtype and device, one
    all-reduce per bucket (a model has hundreds of small tensors; one collective each would be
    latency-bound). A no-op without an initialised process group or with one rank."""
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size(group)
    if world == 1:
        return
    buckets: dict[tuple, list[list[torch.Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for g in tensors:
        if g.is_sparse:
            raise RuntimeError("average_tensors_: sparse tensors are not supported")
        key = (g.dtype, g.device)
        nbytes = g.numel() * g.element_size()
        if key not in buckets or sizes[key] + nbytes > bucket_bytes:
            buckets.setdefault(key, []).append([])
            sizes[key] = 0
        buckets[key][-1].append(g)
        sizes[key] += nbytes
    for bucket_list in buckets.values():
        for bucket in bucket_list:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
