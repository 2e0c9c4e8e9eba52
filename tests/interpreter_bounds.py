"""Bounds checks for kernels run under Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter dereferences raw addresses: a kernel that computes a wrong offset (a wrong
stride, an off-by-one row) reads garbage or writes over other memory, and may kill the whole
pytest process (SIGSEGV) instead of failing one test. ``install()`` makes every masked load
and store of a launch check that the addresses it touches lie inside one storage of the
launch's tensor arguments (descriptor bases included); otherwise it raises ``IndexError``
naming the access, the addresses and the arguments, so that one test fails with a message.
"""

from __future__ import annotations

import numpy as np
import torch

# per launch in progress: the kernel's name and its arguments' storages (start, end, name)
_launches: list[tuple[str, list[tuple[int, int, str]]]] = []


def _ranges(names, args, kwargs) -> list[tuple[int, int, str]]:
    from triton.tools.tensor_descriptor import TensorDescriptor

    out: list[tuple[int, int, str]] = []

    def visit(name: str, arg) -> None:
        if isinstance(arg, tuple):
            for i, a in enumerate(arg):
                visit(f"{name}[{i}]", a)
        elif isinstance(arg, TensorDescriptor):
            visit(name, arg.base)
        elif isinstance(arg, torch.Tensor):
            storage = arg.untyped_storage()
            out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name))

    for name, arg in zip(names, args):
        visit(name, arg)
    for name, arg in kwargs.items():
        visit(name, arg)
    return out


def _check(ptrs, mask, what: str) -> None:
    if not _launches:
        return
    addresses = np.asarray(ptrs.data)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    if addresses.size == 0:
        return
    size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    lo, hi = int(addresses.min()), int(addresses.max()) + size
    kernel, storages = _launches[-1]
    for start, end, _ in storages:
        if start <= lo and hi <= end:
            return
    args = ", ".join(f"{n} [{s:#x}, {e:#x})" for s, e, n in storages)
    raise IndexError(
        f"{kernel}: out-of-bounds {what} under the interpreter: addresses [{lo:#x}, {hi:#x}) "
        f"do not lie inside one tensor argument ({args})"
    )


def install() -> None:
    """Patch the interpreter (idempotent)."""
    from triton.runtime import interpreter as it

    if getattr(it.GridExecutor, "_fastlora_bounds", False):
        return
    run, load, store = (it.GridExecutor.__call__, it.InterpreterBuilder.create_masked_load,
                        it.InterpreterBuilder.create_masked_store)

    def call(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", "kernel")
        _launches.append((name, _ranges(self.arg_names, args, kwargs)))
        try:
            return run(self, *args, **kwargs)
        finally:
            _launches.pop()

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, cache_policy)

    it.GridExecutor.__call__ = call
    it.InterpreterBuilder.create_masked_load = masked_load
    it.InterpreterBuilder.create_masked_store = masked_store
    it.GridExecutor._fastlora_bounds = True
