"""The C entry points of libfastlora_kernels against the fastlora Python package, on a GPU.

    python aot/tests/gpu_compare.py --lib build/libfastlora_kernels.so

Loads the library with ctypes and runs ``fastlora_forward``/``fastlora_backward`` on torch
CUDA tensors (their ``data_ptr()``s, torch's current stream), then checks y, u, dx, dA, dB:
- without dropout, every shape, both dtypes, with and without bias: against
  ``fastlora.reference.lora_linear_reference`` in float64 (autograd for the gradients), by
  the house rule: the error is within twice the error of the same reference run in the
  low-precision dtype (cuBLAS), plus a small atol;
- with dropout: against ``kernels.lora_forward``/``lora_backward`` (the Triton backend's own
  launchers of the same kernels) given the same seed tensor, so the masks must agree.
Exits 77, which ctest reports as skipped, where torch has no CUDA device or the library
lacks the device's arch.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

SKIP = 77
ROOT = Path(__file__).resolve().parents[2]
FP16, BF16 = 0, 1
# (M, N, K, r): aligned and odd shapes (odd ones take the generic, unhinted variants),
# every rank block, a single row, several split-M partials, both tile sizes
SHAPES = [
    (256, 512, 384, 16),
    (1000, 333, 200, 8),
    (4096, 1024, 1024, 64),
    (77, 128, 64, 128),
    (1, 64, 64, 1),
    (3000, 256, 512, 32),
]
DROPOUT_SHAPE, DROPOUT_P = (1000, 256, 320, 16), 0.25
# dropout: C and the Python launchers run the same kernels, fp32 accumulation, one
# rounding; only the tile (_configs.pick vs the C rule), so the fp32 summation order,
# may differ: max |C - Python| <= RTOL * max |Python| + 1e-3
RTOL = {FP16: 1e-2, BF16: 2e-2}


def load(lib_path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(lib_path)
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.fastlora_forward.argtypes = [p, i64, p, i64, p, p, i64, p, i64, p, i64, p,
                                     i64, i64, i64, i64, f32, f32, p, p, ctypes.c_size_t,
                                     i32, p]  # fmt: skip
    lib.fastlora_forward_workspace_size.argtypes = [i64, i64, i64, i64, i32]
    lib.fastlora_forward_workspace_size.restype = ctypes.c_size_t
    lib.fastlora_backward.argtypes = [p, i64, p, i64, p, i64, p, i64, p, i64, p, p, i64, p, p,
                                      i64, i64, i64, i64, f32, f32, p, p, ctypes.c_size_t,
                                      i32, p]  # fmt: skip
    lib.fastlora_backward_workspace_size.argtypes = [i64, i64, i64, i64, i32]
    lib.fastlora_backward_workspace_size.restype = ctypes.c_size_t
    for name in ("fastlora_last_error", "fastlora_build_info", "fastlora_status_string"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.fastlora_status_string.argtypes = [i32]
    return lib


def run_c(lib, x, w, b, A, B, dy, s, p, seed, code, use_workspace):
    import torch

    (M, K), N, r = x.shape, w.shape[0], A.shape[0]
    stream = torch.cuda.current_stream().cuda_stream
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    u = torch.empty(M, r, device=x.device, dtype=x.dtype)
    fbytes = lib.fastlora_forward_workspace_size(M, N, K, r, code)
    fws = torch.empty(fbytes, device=x.device, dtype=torch.uint8) if use_workspace else None
    st = lib.fastlora_forward(
        x.data_ptr(), K, w.data_ptr(), K, b.data_ptr() if b is not None else None,
        A.data_ptr(), K, B.data_ptr(), r, y.data_ptr(), N, u.data_ptr(),
        M, N, K, r, s, p, seed.data_ptr() if seed is not None else None,
        fws.data_ptr() if fws is not None else None, fbytes, code, stream,
    )  # fmt: skip
    if st:
        return st, None
    dx, dA, dB = torch.empty_like(x), torch.empty_like(A), torch.empty_like(B)
    nbytes = lib.fastlora_backward_workspace_size(M, N, K, r, code)
    ws = torch.empty(nbytes, device=x.device, dtype=torch.uint8) if use_workspace else None
    st = lib.fastlora_backward(
        dy.data_ptr(), N, x.data_ptr(), K, w.data_ptr(), K, A.data_ptr(), K,
        B.data_ptr(), r, u.data_ptr(), dx.data_ptr(), K, dA.data_ptr(), dB.data_ptr(),
        M, N, K, r, s, p, seed.data_ptr() if seed is not None else None,
        ws.data_ptr() if ws is not None else None, nbytes, code, stream,
    )  # fmt: skip
    torch.cuda.synchronize()
    return st, {"y": y, "u": u, "dx": dx, "dA": dA, "dB": dB}


def reference(x, w, b, A, B, dy, s, dtype):
    """y, u and the gradients from fastlora's unfused reference, computed in ``dtype``."""
    import torch
    from fastlora.reference import lora_linear_reference

    x, A, B = (t.detach().to(dtype).requires_grad_() for t in (x, A, B))
    w, b, dy = w.to(dtype), b.to(dtype) if b is not None else None, dy.to(dtype)
    y = lora_linear_reference(x, w, b, A, B, s)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    u = (x @ A.t()) * s
    return {"y": y.detach(), "u": u.detach(), "dx": dx, "dA": dA, "dB": dB}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("skipped: torch is not importable")
        return SKIP
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return SKIP
    sys.path.insert(0, str(ROOT))
    from fastlora.triton_backend import _kernels

    lora_backward, lora_forward = _kernels.lora_backward, _kernels.lora_forward

    lib = load(args.lib)
    major, minor = torch.cuda.get_device_capability()
    print(f"{lib.fastlora_build_info().decode()}; device {torch.cuda.get_device_name()} sm_{major}{minor}")  # fmt: skip
    dev = torch.device("cuda")
    torch.manual_seed(0)
    failures, checked, first = [], 0, True

    def inputs(M, N, K, r, dtype, has_bias):
        def t(*shape, scale=1.0):
            return (torch.randn(*shape, device=dev) * scale).to(dtype)

        return (t(M, K), t(N, K, scale=K**-0.5), t(N) if has_bias else None,
                t(r, K, scale=K**-0.5), t(N, r, scale=r**-0.5), t(M, N))  # fmt: skip

    for dtype, code in ((torch.float16, FP16), (torch.bfloat16, BF16)):
        for i, (M, N, K, r) in enumerate(SHAPES):
            for has_bias in (True, False):
                x, w, b, A, B, dy = inputs(M, N, K, r, dtype, has_bias)
                t0 = time.perf_counter()
                st, got = run_c(lib, x, w, b, A, B, dy, 2.0, 0.0, None, code, i % 2 == 1)
                if st == 4:  # FASTLORA_ERROR_ARCH_NOT_BUILT
                    print(f"skipped: {lib.fastlora_last_error().decode()}")
                    return SKIP
                if first:
                    first = False
                    print(f"first C forward+backward (module loads, no JIT): {1e3 * (time.perf_counter() - t0):.0f} ms")  # fmt: skip
                case = f"{dtype} M,N,K,r={M, N, K, r} bias={has_bias}"
                if st:
                    failures.append(f"{case}: status {st}: {lib.fastlora_last_error().decode()}")
                    continue
                exact = reference(x, w, b, A, B, dy, 2.0, torch.float64)
                low = reference(x, w, b, A, B, dy, 2.0, dtype)
                for name, ref in exact.items():
                    checked += 1
                    err = (got[name].double() - ref).abs().max().item()
                    err_torch = (low[name].double() - ref).abs().max().item()
                    bound = 2 * err_torch + 1e-3 * ref.abs().max().item() + 1e-6
                    if not err <= bound:
                        failures.append(f"{case}: {name} error {err:.3g} > {bound:.3g} (torch {dtype}: {err_torch:.3g})")  # fmt: skip
        # dropout: the same seed must give the Python kernels' mask
        M, N, K, r = DROPOUT_SHAPE
        x, w, b, A, B, dy = inputs(M, N, K, r, dtype, True)
        seed = torch.tensor([20240611], device=dev, dtype=torch.int64)
        st, got = run_c(lib, x, w, b, A, B, dy, 2.0, DROPOUT_P, seed, code, False)
        case = f"{dtype} M,N,K,r={M, N, K, r} dropout={DROPOUT_P}"
        if st:
            failures.append(f"{case}: status {st}: {lib.fastlora_last_error().decode()}")
            continue
        y, u = lora_forward(x, w, b, A, B, 2.0, DROPOUT_P, seed)
        dx, dA, dB = lora_backward(dy, x, w, A, B, u, 2.0, DROPOUT_P, seed)
        for name, ref in (("y", y), ("u", u), ("dx", dx), ("dA", dA), ("dB", dB)):
            checked += 1
            err = (got[name].float() - ref.float()).abs().max().item()
            bound = RTOL[code] * ref.float().abs().max().item() + 1e-3
            if not err <= bound:
                failures.append(f"{case}: {name} |C - Python| {err:.3g} > {bound:.3g}")
    for f in failures:
        print("FAIL", f)
    print(f"{checked} comparisons, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
