"""Mutation smoke: deliberate bugs that the test suite must catch.

    python -m tests.mutation_smoke            # every mutant, 2 in parallel
    python -m tests.mutation_smoke -k dropout -j 1 --list

Each mutant is one exact source edit applied to a fresh copy of the checkout in a temporary
directory. Its anchor must occur exactly once: an anchor that a code change moved is reported
as stale (and fails the run) instead of silently testing nothing, and is never counted as a
kill.  The copy is laid out as
installed (``fastlora/`` with ``kernels/`` inside it as ``fastlora/kernels/``) and is first
on ``sys.path`` of the child pytest, which checks at start-up that it imported the copy
(``FASTLORA_EXPECT_ROOT``, see ``tests/conftest.py``): the editable install maps
``fastlora.kernels`` to the checkout, so PYTHONPATH alone would test the unmutated kernels.

Verdicts come from the child's JUnit XML report, not its exit status alone:

    killed     a selected test failed in its call with an assertion or a clear exception
    survived   every selected test passed
    crashed    the child died (a signal, a timeout), pytest stopped on an internal, usage or
               collection error, no test ran, or only set-up/tear-down errors were reported
    stale      the anchor no longer occurs exactly once: the edit was never run

The unmutated copy runs every selected test first: kills only count against a green
baseline.  The four counts are printed separately; exit status 0 only when every listed
mutant is killed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what a child needs besides the package: the tests, and benchmarks/ (tests import its
# saved-bytes counter), pyproject.toml (pytest config)
COPIED = ("fastlora", "tests", "benchmarks", "pyproject.toml")
TIMEOUT_S = 300


class MutantError(RuntimeError):
    """A mutant that cannot be applied exactly as written."""


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the checkout, e.g. "kernels/lora_forward.py"
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids / files, relative to the checkout
    why: str = ""


def _m(name, path, old, new, *tests, why=""):
    return Mutant(name, path, old, new, tuple(tests), why)


# one parametrization each, chosen to cross tile edges (M = 37, N = 72 and K = 40 are off
# every tile size) and run fast under the interpreter
KD = "tests/test_kernels.py::test_launchers_dropout_one_mask[p0.25-float32]"
KL = "tests/test_kernels.py::test_launchers_match_reference[M37-K40-N72-r3-float32-bias]"
KSTAT = "tests/test_kernels.py::test_philox_mask_matches_independent_reference"
DORA_P0 = "tests/test_dora.py::test_matches_float64_reference[37-24-40-4-bias-p0-torch.float64]"
DORA_P = "tests/test_dora.py::test_matches_float64_reference[37-24-40-4-bias-p0.25-torch.float64]"
DORA_K = "tests/test_dora_kernels.py::test_launchers_match_reference[M37-K40-N72-r3-float32-p0-bias]"
KTMA = "tests/test_kernels.py::test_tma_persistent_build_matches_reference[p0-float32]"

MUTANTS: list[Mutant] = [
    # ---- the audit's table (issue 15): each must be caught by the test that let it pass
    _m("load_adapter copies before validating", "fastlora/adapter.py",
       "        _check_adapter_tensors(model, tensors, sorted(layers), head_names, config, where)\n",
       "        with torch.no_grad():\n"
       "            for name, layer in layers.items():\n"
       "                key = _key(name, 'lora_A')\n"
       "                if key in tensors and tensors[key].shape == layer.lora_A.shape:\n"
       "                    layer.lora_A.copy_(tensors[key])\n"
       "        _check_adapter_tensors(model, tensors, sorted(layers), head_names, config, where)\n",
       "tests/test_adapter.py::test_failed_load_leaves_lora_model_unchanged"),
    _m("merge in bf16 arithmetic", "fastlora/layer.py",
       "        merged = self.weight.to(delta.dtype) + delta\n",
       "        merged = (self.weight + delta.to(self.weight.dtype)).to(delta.dtype)\n",
       "tests/test_layer.py::test_merge_rounds_once_unmerge_within_two_roundings"),
    _m("keep_scale returns 1.0", "fastlora/dropout.py",
       "    return _LEVELS / (_LEVELS - _threshold(p))\n", "    return 1.0\n",
       "tests/test_properties.py::test_matches_reference_on_random_cases[torch-dropout]"),
    _m("u scaled by 1.5 in every dtype", "fastlora/torch_backend.py",
       "        u = torch.mm(x, (lora_A * scaling).to(x.dtype).t())\n",
       "        u = torch.mm(x, (lora_A * (scaling * 1.5)).to(x.dtype).t())\n",
       "tests/test_compose.py::test_autocast_cpu"),
    # ---- torch backend dropout
    _m("keep_scale ignores the 2**-16 rounding", "fastlora/dropout.py",
       "    return _LEVELS / (_LEVELS - _threshold(p))\n", "    return 1.0 / (1.0 - p)\n",
       "tests/test_dropout.py::test_keep_rate_and_scale_resolve_the_rounding"),
    _m("mask threshold off by one level", "fastlora/dropout.py",
       "    low = _threshold(p) - _LEVELS // 2\n",
       "    low = _threshold(p) - _LEVELS // 2 + 1\n",
       "tests/test_dropout.py::test_keep_rate_and_scale_resolve_the_rounding"),
    _m("torch backward drops the mask on dx", "fastlora/torch_backend.py",
       "            if keep is not None:\n                dx.mul_(keep)\n",
       "            pass\n",
       "tests/test_dropout.py::test_given_mask_matches_reference"),
    _m("torch backward draws a fresh mask", "fastlora/torch_backend.py",
       "        keep = None if mask_bits is None else _keep(x, mask_bits)\n",
       "        keep = None if mask_bits is None else _keep(\n"
       "            x, draw_packed_mask(x.shape[0], x.shape[1], dropout_p, x.device))\n",
       "tests/test_dropout.py::test_backward_uses_the_forward_mask"),
    _m("scratch buffers shared across roles", "fastlora/_scratch.py",
       "    buf = _WORKSPACE.buffers.get((role, dtype))\n",
       "    role = \"shared\"\n    buf = _WORKSPACE.buffers.get((role, dtype))\n",
       "tests/test_fp8.py::test_dropout_matches_the_dense_base_of_the_same_values"),
    # ---- Triton kernels, shared tiles: the dropout mask, the TMA epilogue
    _m("mask keyed by a shifted column", "kernels/_tiles.py",
       "    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4)\n",
       "    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4) + 1\n",
       KSTAT),
    _m("TMA epilogue stores one subtile twice", "kernels/_tiles.py",
       "            dst.store([m0, c0], v0.to(dst.dtype))\n",
       "            dst.store([m0, c0], v1.to(dst.dtype))\n",
       KTMA),
    # ---- Triton kernels: forward (shrink + GEMM with the LoRA epilogue)
    _m("forward: wrong dropout scale", "kernels/_tiles.py",
       "    return tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)\n",
       "    return tl.where(keep, x.to(tl.float32), 0.0).to(x.dtype)\n",
       KD),
    _m("forward: dropped mask", "kernels/_tiles.py",
       "    return tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)\n",
       "    return (x.to(tl.float32) * (1.0 / (1.0 - p))).to(x.dtype)\n",
       KD),
    _m("forward: wrong scale of u", "kernels/lora_forward.py",
       "        (acc * s).to(u_ptr.dtype.element_ty),",
       "        (acc * s * 1.5).to(u_ptr.dtype.element_ty),",
       KL),
    _m("forward: off-by-one edge mask on the bias", "kernels/lora_forward.py",
       "        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)",
       "        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N - 1, other=0.0)",
       KL),
    _m("forward: off-by-one edge mask on B^T", "kernels/lora_forward.py",
       "            mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0,\n",
       "            mask=(offs_r[:, None] < R) & (offs_n[None, :] < N - 1), other=0.0,\n",
       KL),
    # ---- Triton kernels: the dy pass (g and the dB partials)
    _m("dy pass: wrong scale of g", "kernels/lora_backward.py",
       "            (g_acc * s).to(g_ptr.dtype.element_ty),",
       "            (g_acc * s * 1.5).to(g_ptr.dtype.element_ty),",
       KL),
    # ---- Triton kernels: dx
    _m("dx: wrong dropout scale", "kernels/lora_backward.py",
       "                low = tl.where(keep, low * inv_keep, 0.0)\n",
       "                low = tl.where(keep, low, 0.0)\n",
       KD),
    _m("dx: dropped mask", "kernels/lora_backward.py",
       "                low = tl.where(keep, low * inv_keep, 0.0)\n",
       "                low = low * inv_keep\n",
       KD),
    _m("dx: mask from another seed", "kernels/lora_backward.py",
       "            keep = dropout_keep(seed, offs_m, k0, p, BLOCK_K)\n",
       "            keep = dropout_keep(seed + 1, offs_m, k0, p, BLOCK_K)\n",
       KD),
    _m("dx: off-by-one edge mask on A", "kernels/lora_backward.py",
       "                mask=mask_r[:, None] & mask_k[None, :], other=0.0,\n            ).to(dtype)",
       "                mask=mask_r[:, None] & (offs_k < K - 1)[None, :], other=0.0,\n            ).to(dtype)",
       KL),
    # ---- Triton kernels: dA (partials in the dx epilogue, then the reduce)
    _m("dA: wrong dropout scale", "kernels/lora_backward.py",
       "                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)\n",
       "                x = tl.where(keep, x.to(tl.float32), 0.0).to(dtype)\n",
       KD),
    _m("dA: dropped mask", "kernels/lora_backward.py",
       "                x = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0).to(dtype)\n",
       "                x = (x.to(tl.float32) * inv_keep).to(dtype)\n",
       KD),
    _m("dA: off-by-one edge mask on the partial", "kernels/lora_backward.py",
       "                part, mask=mask_r[:, None] & mask_k[None, :],\n",
       "                part, mask=mask_r[:, None] & (offs_k < K - 1)[None, :],\n",
       KL),
    _m("dA: reduce drops the last partial", "kernels/lora_backward.py",
       "        for i in range(0, PA):\n", "        for i in range(0, PA - 1):\n",
       KL),
    # ---- Triton kernels: dB (partials in the dy pass, then the reduce)
    _m("dB: wrong scale", "kernels/lora_backward.py",
       "            part = tl.dot(dy.T, u, input_precision=DOT_PRECISION)",
       "            part = 1.5 * tl.dot(dy.T, u, input_precision=DOT_PRECISION)",
       KL),
    _m("dB: off-by-one edge mask on the partial", "kernels/lora_backward.py",
       "                part, mask=mask_n[:, None] & mask_r[None, :],\n",
       "                part, mask=(offs_n < N - 1)[:, None] & mask_r[None, :],\n",
       KL),
    _m("dB: reduce drops the last partial", "kernels/lora_backward.py",
       "        for i in range(0, PB):\n", "        for i in range(0, PB - 1):\n",
       KL),
    # ---- DoRA (fastlora/dora.py, fastlora/dora_torch.py, the layer's merge)
    _m("DoRA: cheap norm's cross term halved", "fastlora/dora.py",
       "    sq = sq_norm.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * quad\n",
       "    sq = sq_norm.to(acc) + (1.0 * scaling) * cross + (scaling * scaling) * quad\n",
       "tests/test_dora.py::test_cheap_norm_matches_the_formed_weight[torch.float64]"),
    _m("DoRA: dm not divided by the norm", "fastlora/dora_torch.py",
       "            dm = ((ks * _column_dot(dy, S, acc) + low) / norm).to(magnitude.dtype)\n",
       "            dm = (ks * _column_dot(dy, S, acc) + low).to(magnitude.dtype)\n",
       DORA_P0),
    _m("DoRA: magnitude scale missing on dB", "fastlora/dora_torch.py",
       "            dB = t.mul_(c).t()",
       "            dB = t.t()",
       DORA_P0),
    _m("DoRA: c instead of c - 1 with dropout", "fastlora/dora_torch.py",
       "addcmul_(S, _minus_one(c_acc, x.dtype, ks))",
       "addcmul_(S, (c_acc * ks).to(x.dtype))",
       DORA_P),
    _m("DoRA: merge multiplies by the norm", "fastlora/layer.py",
       "            factor = self.lora_magnitude_vector.to(delta.dtype) / self._merged_norm\n"
       "            merged.mul_",
       "            factor = self.lora_magnitude_vector.to(delta.dtype) * self._merged_norm\n"
       "            merged.mul_",
       "tests/test_dora.py::test_merge_and_unmerge_like_peft"),
    _m("DoRA kernel: column scale m * norm", "kernels/lora_forward.py",
       "    return m / tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)\n",
       "    return m * tl.load(norm_ptr + offs_n, mask=mask_n, other=1.0)\n",
       DORA_K),
    _m("DoRA kernel: dm not divided by the norm", "kernels/lora_backward.py",
       "        acc = acc / tl.load(norm_ptr + offs, mask=offs < NM, other=1.0)\n",
       "        acc = acc\n",
       DORA_K),
    # ---- the 4-bit base (kernels/dequant_4bit.py, fastlora/bases.py)
    _m("4-bit tile: wrong absmax index (one scale per row)", "kernels/dequant_4bit.py",
       "        block = offs_n * blocks_per_row + k0 // BLOCKSIZE\n",
       "        block = offs_n * blocks_per_row\n",
       "tests/test_qlora.py::test_gemm_tile_loader_matches_bitsandbytes[nf4-64]"),
    _m("4-bit tile: wrong absmax index (several per row)", "kernels/dequant_4bit.py",
       "        block = offs_n[:, None] * blocks_per_row + offs_g[None, :]\n",
       "        block = offs_n[:, None] * blocks_per_row + offs_g[None, :] // 2\n",
       "tests/test_qlora.py::test_gemm_tile_loader_matches_bitsandbytes[nf4-32]"),
    _m("4-bit tile: nibbles swapped", "kernels/dequant_4bit.py",
       "    code = tl.interleave(byte >> 4, byte & 15)",
       "    code = tl.interleave(byte & 15, byte >> 4)",
       "tests/test_qlora.py::test_gemm_tile_loader_matches_bitsandbytes[fp4-64]"),
    _m("4-bit tile: double-quant offset dropped", "kernels/dequant_4bit.py",
       "            absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0\n        ) + tl.load(offset_ptr)\n",
       "            absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0\n        )\n",
       "tests/test_qlora.py::test_gemm_tile_loader_matches_bitsandbytes[nf4-dq-64]"),
    _m("4-bit decode: wrong absmax index", "kernels/dequant_4bit.py",
       "    block = idx // blocksize\n", "    block = idx // (2 * blocksize)\n",
       "tests/test_qlora.py::test_triton_decode_matches_bitsandbytes[nf4-64]"),
    _m("4-bit torch path: double-quant offset dropped", "fastlora/bases.py",
       "        return (bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()\n",
       "        return bnbF.dequantize_blockwise(qs.absmax, qs.state2).float()\n",
       "tests/test_qlora.py::test_forward_and_grads_match_reference[torch-nf4-dq-K128-bs64]"),
    _m("4-bit torch path: wrong absmax index on straddling blocks", "fastlora/bases.py",
       "        scale = self.absmax().repeat_interleave(self.blocksize)[: N * K]\n",
       "        scale = self.absmax().repeat_interleave(2 * self.blocksize)[: N * K]\n",
       "tests/test_base_decode.py::test_dense_decode_equals_bitsandbytes[nf4-straddle-K100]"),
    _m("4-bit fused GEMM: every K step decodes the first tile", "kernels/_tiles.py",
       "            w_src[0], w_src[1], w_src[2], w_src[3], w_src[4], n0, k0, N, K,\n",
       "            w_src[0], w_src[1], w_src[2], w_src[3], w_src[4], n0, 0, N, K,\n",
       "tests/test_qlora.py::test_forward_and_grads_match_reference[triton-nf4-K128-bs64]"),
    # ---- save/load key mapping
    _m("adapter keys without PEFT's prefix", "fastlora/adapter.py",
       'KEY_PREFIX = "base_model.model."\n', 'KEY_PREFIX = "base_model."\n',
       "tests/test_adapter.py::test_fastlora_saves_peft_loads[plain-True]"),
    # ---- the nine that escaped the suite (issue 23), each on the path a user takes
    _m("4-bit layer keeps dropout on in eval", "fastlora/layer.py",
       "self.scaling, self.lora_dropout, self.training, *dora_args)",
       "self.scaling, self.lora_dropout, True, *dora_args)",
       "tests/test_qlora_paths.py::test_eval_mode_turns_dropout_off_on_a_4bit_layer[torch]"),
    _m("DoRA unfrozen base: dW without the column scale", "fastlora/dora_torch.py",
       "dW = torch.mm((dy * c).t(), x)", "dW = torch.mm(dy.t(), x)",
       "tests/test_dora_base_grad.py::test_unfrozen_base_gets_dora_scaled_grads[torch]"),
    _m("4-bit nested: second-level scale index dropped", "kernels/dequant_4bit.py",
       "absmax2_ptr + block // NESTED_BLOCKSIZE,", "absmax2_ptr + 0 * block,",
       "tests/test_qlora_paths.py::test_nested_quant_with_more_than_256_absmax_blocks[triton-nf4]"),
    _m("target regex: re.match instead of re.fullmatch", "fastlora/model.py",
       "re.fullmatch(spec, name)", "re.match(spec, name)",
       "tests/test_target_names.py::test_prefix_of_a_longer_name_is_not_matched"),
    _m("load: lora_dropout read from a wrong key", "fastlora/model.py",
       'get("lora_dropout", 0.0)', 'get("dropout", 0.0)',
       "tests/test_roundtrip_fields.py::test_every_config_field_survives_a_round_trip[lists]"),
    _m("save: exclude_modules written as null", "fastlora/adapter.py",
       '"exclude_modules": config.exclude_modules,', '"exclude_modules": None,',
       "tests/test_roundtrip_fields.py::test_every_config_field_survives_a_round_trip[lists]"),
    _m("Trainer: load_best_model_at_end keeps the last checkpoint", "fastlora/integrations.py",
       "    load_checkpoint(_unwrap(self), best)\n", "    pass\n",
       "tests/test_trainer_fast.py::test_load_best_model_at_end_loads_the_best_checkpoint"),
    _m("resume: head restored into a copy", "fastlora/heads.py",
       't.copy_(tensors[f"{KEY_PREFIX}{name}.{key}"])',
       't.clone().copy_(tensors[f"{KEY_PREFIX}{name}.{key}"])',
       "tests/test_trainer_fast.py::test_checkpoint_round_trip_restores_the_head_in_place"),
    _m("dx stored with x's strides", "kernels/lora_backward.py",
       "M, K, stride_dxm, stride_dxk,", "M, K, stride_xm, stride_xk,",
       "tests/test_kernels.py::test_strided_inputs"),
    _m("FP8 on sm_90: the pointer loader launched off TMA", "kernels/lora_forward.py",
       "    if arch >= 90 and not (tma and K % TMA_ALIGN_CODES == 0):\n",
       "    if arch > 90 and not (tma and K % TMA_ALIGN_CODES == 0):\n",
       "tests/test_fp8_kernels.py::test_sm90_calls_off_tma_decode_once_and_run_the_dense_kernels"
       "[odd-K]"),
]


# ------------------------------------------------------------------------------ machinery

# exception types that say the process is in trouble rather than that a check caught the bug
CRASH_TYPES = frozenset({"MemoryError", "RecursionError", "SystemError", "KeyboardInterrupt",
                         "SystemExit"})
VERDICTS = ("killed", "survived", "crashed", "stale")


def in_copy(path: str) -> str:
    """Where a checkout path lives in a copy: ``kernels/`` is installed as ``fastlora/kernels/``."""
    return "fastlora/" + path if path.startswith("kernels/") else path


def apply_mutant(root: Path, mutant: Mutant) -> None:
    """Edit ``mutant.path`` in the copy at ``root`` in place; ``MutantError`` unless the
    anchor occurs exactly once."""
    file = root / in_copy(mutant.path)
    if not file.is_file():
        raise MutantError(f"mutant {mutant.name!r}: no file {mutant.path}")
    text = file.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise MutantError(
            f"mutant {mutant.name!r}: anchor found {count} times in {mutant.path} "
            f"(expected exactly once; re-anchor it on the current code):\n{mutant.old}"
        )
    file.write_text(text.replace(mutant.old, mutant.new))


def make_copy(dest: Path) -> Path:
    """The checkout's package, kernels and tests under ``dest``, laid out as installed (a
    ``kernels/`` without ``__init__.py`` becomes a namespace package there, as installed)."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    shutil.copytree(ROOT / "kernels", dest / "fastlora" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def child_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FASTLORA_EXPECT_ROOT"] = str(root)  # conftest refuses to run against another copy
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("CI", "1")  # the fixed hypothesis profile
    return env


@dataclasses.dataclass
class Report:
    """What one child pytest run said: its exit status (None: timed out, negative: killed by
    that signal) and, from its JUnit XML, the passed tests, the failed ones with the type of
    the exception that failed them, and the set-up/tear-down/collection errors."""

    returncode: int | None
    passed: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    log: str = ""


def _exception_type(element: ET.Element) -> str:
    """The exception type of a JUnit <failure>/<error>: pytest ends its text with
    ``path:line: ExceptionType``; the message's ``Type: ...`` prefix otherwise."""
    lines = [line for line in (element.text or "").splitlines() if line.strip()]
    if lines and ": " in lines[-1]:
        return lines[-1].rsplit(": ", 1)[1].strip()
    message = element.get("message", "")
    head = message.split(":", 1)[0].strip()
    if head.isidentifier():
        return head
    return "AssertionError" if message.startswith("assert") else "?"


def parse_junit(path: Path) -> tuple[int, list[tuple[str, str]], list[tuple[str, str]]]:
    """(passed, failures, errors) of a pytest JUnit XML report; each failure or error as
    (test id, exception type)."""
    passed, failures, errors = 0, [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None:
            failures.append((test, _exception_type(failure)))
        if error is not None:
            errors.append((test, _exception_type(error)))
        if failure is None and error is None and skipped is None:
            passed += 1
    return passed, failures, errors


def run_tests(root: Path, tests: tuple[str, ...], first_failure: bool = True) -> Report:
    xml = root / "mutation-report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--no-header", "-rN", f"--junitxml={xml}", *(["-x"] if first_failure else []), *tests]
    try:
        out = subprocess.run(cmd, cwd=root, env=child_env(root), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Report(None, log=f"timed out after {TIMEOUT_S} s")
    report = Report(out.returncode, log=out.stdout[-3000:] + out.stderr[-3000:])
    if xml.is_file():
        try:
            report.passed, report.failures, report.errors = parse_junit(xml)
        except ET.ParseError as err:  # a child killed while writing it
            report.errors.append(("<report>", f"unreadable JUnit XML ({err})"))
    return report


def classify(report: Report) -> tuple[str, str]:
    """(verdict, why) of a mutant's run; see the module docstring."""
    rc = report.returncode
    if rc is None:
        return "crashed", "timed out"
    if rc < 0:
        return "crashed", f"killed by signal {-rc}"
    if rc not in (0, 1):
        return "crashed", f"pytest exit {rc} (interrupted, internal, usage or collection error)"
    clear = [(t, e) for t, e in report.failures if e not in CRASH_TYPES]
    if rc == 1 and clear:
        return "killed", ", ".join(f"{t} ({e})" for t, e in clear[:3])
    if rc == 0 and report.passed and not report.failures and not report.errors:
        return "survived", f"{report.passed} tests passed"
    if not report.passed and not report.failures and not report.errors:
        return "crashed", "no test ran"
    return "crashed", "only errors: " + ", ".join(
        f"{t} ({e})" for t, e in (report.errors + report.failures)[:3])


@dataclasses.dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # one of VERDICTS
    seconds: float
    detail: str = ""


def run_mutant(mutant: Mutant, workdir: Path) -> Outcome:
    start = time.monotonic()
    root = make_copy(Path(tempfile.mkdtemp(prefix="mutant-", dir=workdir)))
    try:
        apply_mutant(root, mutant)
        report = run_tests(root, mutant.tests)
    except MutantError as err:  # checked before, so only if the copy changed under us
        return Outcome(mutant, "stale", time.monotonic() - start, str(err))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    verdict, why = classify(report)
    detail = why if verdict == "killed" else f"{why}\n{report.log}"
    return Outcome(mutant, verdict, time.monotonic() - start, detail)


def stale_anchors(mutants: list[Mutant], workdir: Path) -> dict[str, str]:
    """Mutant name -> why, for each anchor that does not occur exactly once (each checked on a
    scratch copy of its file alone)."""
    stale = {}
    for m in mutants:
        scratch = workdir / "anchors"
        target = scratch / in_copy(m.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / m.path if (ROOT / m.path).exists() else os.devnull, target)
        try:
            apply_mutant(scratch, m)
        except MutantError as err:
            stale[m.name] = str(err)
        shutil.rmtree(scratch)
    return stale


def main(argv: list[str] | None = None, mutants: list[Mutant] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation_smoke", description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("-j", type=int, default=2, help="mutants run in parallel (default 2)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the selected tests on the unmutated copy")
    args = parser.parse_args(argv)
    chosen = [m for m in (MUTANTS if mutants is None else mutants) if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name:45s} {m.path:28s} {' '.join(m.tests)}")
        return 0
    if not chosen:
        print(f"no mutant matches {args.k!r}", file=sys.stderr)
        return 2
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastlora-mutation-") as tmp:
        workdir = Path(tmp)
        stale = stale_anchors(chosen, workdir)
        outcomes = [Outcome(m, "stale", 0.0, stale[m.name]) for m in chosen if m.name in stale]
        runnable = [m for m in chosen if m.name not in stale]
        if runnable and not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in runnable for t in m.tests))
            base = run_tests(make_copy(workdir / "baseline"), tests, first_failure=False)
            if base.returncode != 0 or base.failures or base.errors or not base.passed:
                print(f"baseline: the selected tests do not all pass on the unmutated copy "
                      f"(exit {base.returncode}, {base.passed} passed, failures {base.failures}, "
                      f"errors {base.errors}):\n{base.log}", file=sys.stderr)
                return 1
            print(f"baseline: {len(tests)} test selections pass on the unmutated copy "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.j)) as pool:
            futures = [pool.submit(run_mutant, m, workdir) for m in runnable]
            for f in concurrent.futures.as_completed(futures):
                o = f.result()
                outcomes.append(o)
                print(f"  {o.verdict:8s} {o.seconds:6.1f} s  {o.mutant.name}", flush=True)
    order = {m.name: i for i, m in enumerate(chosen)}
    outcomes.sort(key=lambda o: order[o.mutant.name])
    print("\n| mutant | file | verdict | s | tests |\n|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.mutant.name} | {o.mutant.path} | {o.verdict} | {o.seconds:.0f} | "
              f"{' '.join(t.removeprefix('tests/') for t in o.mutant.tests)} |")
    counts = {v: sum(o.verdict == v for o in outcomes) for v in VERDICTS}
    for o in outcomes:
        if o.verdict != "killed":
            print(f"\n--- {o.verdict.upper()}: {o.mutant.name}\n{o.detail}", file=sys.stderr)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\nkilled {counts['killed']}, survived {counts['survived']}, crashed "
          f"{counts['crashed']}, stale {counts['stale']} (of {len(outcomes)} mutants)")
    print(f"{counts['killed']}/{len(outcomes)} mutants killed in "
          f"{time.monotonic() - start:.0f} s wall (-j {args.j}), "
          f"{cpu.ru_utime + cpu.ru_stime:.0f} s CPU in the test processes")
    return 0 if counts["killed"] == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
