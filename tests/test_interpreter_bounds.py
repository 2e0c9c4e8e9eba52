"""The interpreter's bounds checks (tests/interpreter_bounds.py, installed by conftest): a kernel
that reads or writes outside its tensor arguments fails its test with a message naming the
kernel and the access, instead of corrupting memory or killing pytest; in-bounds and masked
accesses run as before."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the checks guard Triton's interpreter only", allow_module_level=True)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.errors import InterpreterError  # noqa: E402


@triton.jit
def _copy(src_ptr, dst_ptr, n, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(src_ptr + offs * stride, mask=mask, other=0.0)
    tl.store(dst_ptr + offs * stride, v, mask=mask)


def test_in_bounds_and_masked_accesses_run():
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(10)
    _copy[(1,)](src, dst, 10, 1, BLOCK=16)  # lanes 10..15 masked off: never checked
    assert torch.equal(dst, src)


def test_a_wrong_stride_fails_with_a_message():
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(10)
    with pytest.raises(InterpreterError, match=r"_copy: out-of-bounds load .*src_ptr"):
        _copy[(1,)](src, dst, 10, 2, BLOCK=16)


def test_a_store_past_the_end_fails_before_writing():
    big, small = torch.arange(20, dtype=torch.float32), torch.zeros(10)
    guard = torch.zeros(10)  # a neighbour the store must not reach
    with pytest.raises(InterpreterError, match=r"_copy: out-of-bounds store"):
        _copy[(1,)](big, small, 20, 1, BLOCK=32)
    assert torch.equal(small, torch.zeros(10)) and torch.equal(guard, torch.zeros(10))
