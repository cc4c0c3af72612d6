"""One op family: the C++ schemas (csrc/ops.cpp) and the Triton ops' schemas are the same, every fused
backend runs the one step of backends/fused.py, and the registry knows which implementation exists."""

from __future__ import annotations

import re

import pytest
import torch

from rose_kernels import backends, ops
from rose_kernels.backends import fused

pytestmark = pytest.mark.skipif(not ops.available(), reason="the C++ extension is not built")


def _normalised(schema) -> str:
    """The schema without its namespace and with alias sets unnamed (custom_op numbers them a0, a1, ...,
    TORCH_LIBRARY letters them a, b, ...): what callers see."""
    text = str(schema).split("::", 1)[1]
    return re.sub(r"\((\w+)!\)", "(!)", text)


def test_native_ops_have_the_documented_names():
    for name in ops.OP_NAMES:
        assert hasattr(torch.ops.rose_kernels, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rose_kernels::{name}", "CPU"), name
    assert torch.ops.rose_kernels.built_with_cuda() == ops.built_with_cuda()


def test_triton_ops_take_the_same_arguments_as_the_native_ops():
    pytest.importorskip("triton")
    from conftest import skip_module_unless_triton_runs

    skip_module_unless_triton_runs()
    from rose_kernels.backends.triton import TRITON_OPS

    for name in ops.OP_NAMES:
        native = _normalised(getattr(torch.ops.rose_kernels, name).default._schema)
        triton_op = getattr(TRITON_OPS, name)
        triton_schema = _normalised(getattr(torch.ops.rose_triton, name).default._schema)
        assert triton_schema == native, f"{name}: rose_triton {triton_schema} != rose_kernels {native}"
        assert callable(triton_op)


def test_every_fused_backend_runs_the_one_step():
    cpu = backends.resolve("cpu", torch.device("cpu"))
    assert isinstance(cpu, fused.FusedBackend) and type(cpu).step is fused.FusedBackend.step
    assert type(cpu).record_first_order is fused.FusedBackend.record_first_order
    cuda = backends._get("cuda")
    assert isinstance(cuda, fused.FusedBackend) and type(cuda).step is fused.FusedBackend.step
    assert cuda.supports_device(torch.device("cuda")) == ops.built_with_cuda()
    assert not cuda.supports_device(torch.device("cpu"))


def test_table_layouts_match_the_cpp_enums():
    with open(__file__.replace("tests/test_op_family.py", "csrc/common.h")) as f:
        header = f.read()

    def enum_names(enum: str) -> list[str]:
        body = header.split(f"enum {enum} : int64_t {{", 1)[1].split("};", 1)[0]
        return [line.split("=")[0].split(",")[0].strip() for line in body.splitlines()
                if line.strip().startswith("k") and not line.strip().startswith("kNum")]

    def snake(name: str) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name[1:]).lower()

    assert [snake(n) for n in enum_names("HyperColumn")] == list(ops.HYPER_COLUMNS)
    assert [snake(n) for n in enum_names("MaskColumn")] == list(ops.MASK_COLUMNS)
    assert [snake(n).removeprefix("thr_") for n in enum_names("ThresholdColumn")] == [
        c.replace("nonfinite", "non_finite") for c in ops.THRESHOLD_COLUMNS]
