"""The backend registry: one place that knows which implementations exist and which is fastest.

The fused backends (cpu, cuda, triton) are one step (backends/fused.py) over three implementations
of one op family; ``reference`` drives the oracle. A backend is a ``backends.base.Backend`` (the
contract: what it declares and what it implements, with the semantics of ``rose_kernels.reference``);
adding one means registering it here, nothing else.
"""

from __future__ import annotations

import importlib.util

import torch

from rose_kernels.backends.base import Backend
from rose_kernels.backends.fused import CpuBackend, CudaBackend
from rose_kernels.backends.reference import ReferenceBackend

__all__ = ["Backend", "names", "register", "resolve"]

_BACKENDS = {backend.name: backend for backend in (ReferenceBackend(), CpuBackend(), CudaBackend())}

# Fastest first, per device type; "auto" takes the first one that supports the device (the CUDA
# kernels only exist in an extension built against a CUDA torch with nvcc).
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# Backends whose module is imported on first use (importing Triton costs ~1 s): name -> loader.
_LAZY = {}
if importlib.util.find_spec("triton") is not None:
    def _load_triton():
        from rose_kernels.backends.triton import TritonBackend

        return TritonBackend()

    _LAZY["triton"] = _load_triton


def _get(name: str) -> Backend | None:
    backend = _BACKENDS.get(name)
    if backend is None and name in _LAZY:
        backend = _BACKENDS[name] = _LAZY.pop(name)()
    return backend


def register(backend: Backend, *, prefer_for: tuple[str, ...] = ()) -> None:
    """Adds a backend; ``prefer_for`` lists device types for which it goes first under "auto"."""
    _BACKENDS[backend.name] = backend
    for device_type in prefer_for:
        _PREFERENCE[device_type] = (backend.name, *_PREFERENCE.get(device_type, ("reference",)))


def names() -> tuple[str, ...]:
    return (*_BACKENDS, *(name for name in _LAZY if name not in _BACKENDS))


def resolve(name: str, device: torch.device) -> Backend:
    """The backend object for ``name`` ("auto" or a registered name) on ``device``."""
    if name == "auto":
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            backend = _get(candidate)
            if backend is not None and backend.supports_device(device):
                return backend
        return _BACKENDS["reference"]
    backend = _get(name)
    if backend is None:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(names())} or 'auto'")
    if not backend.supports_device(device):
        raise RuntimeError(f"backend {name!r} cannot run on {device} (is the extension built?)")
    return backend
