"""Every embedded cubin against what the C launcher passes it, without a GPU.

    python aot/tests/check_abi.py build/gen

Reads the manifests aot/generate.py writes (fl_sm<arch>_<dtype>.json: per cubin, the
function name, the arch and the byte size of each parameter the generated packer lays
out) and checks, with the ``cuobjdump`` Triton ships, that the cubin's kernel has exactly
those parameters (count, order, sizes: EIATTR_KPARAM_INFO) and targets that arch.  A
launch with a wrong parameter list would read garbage on the GPU; this catches it here.
Exits 77 (skipped) where no cuobjdump is found.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SKIP = 77


def cuobjdump() -> str | None:
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else None
    except ImportError:
        return None


def kernel_params(elf: str, function: str) -> list[int]:
    """Parameter sizes by ordinal from the .nv.info.<function> section of `cuobjdump -elf`."""
    section = re.search(rf"^\.nv\.info\.{re.escape(function)}\n(.*?)(?=^\.\S)", elf, re.M | re.S)
    if not section:
        raise ValueError(f"no .nv.info.{function} section")
    pattern = r"Ordinal\s*:\s*(0x[0-9a-f]+).*?Size\s*:\s*(0x[0-9a-f]+)"
    found = {int(o, 16): int(s, 16) for o, s in re.findall(pattern, section.group(1))}
    return [found[i] for i in range(len(found))]


def main() -> int:
    gen = Path(sys.argv[1])
    tool = cuobjdump()
    if tool is None:
        print("skipped: no cuobjdump in Triton's package")
        return SKIP
    manifests = sorted(gen.glob("fl_sm*.json"))
    if not manifests:
        print(f"FAIL: no manifests in {gen}")
        return 1
    bad, n = [], 0
    for m in manifests:
        for entry in json.loads(m.read_text()):
            n += 1
            elf = subprocess.run([tool, "-elf", entry["cubin"]], capture_output=True, text=True,
                                 check=True).stdout  # fmt: skip
            name = Path(entry["cubin"]).name
            try:
                got = kernel_params(elf, entry["function"])
            except (ValueError, KeyError) as e:
                bad.append(f"{m.name} {name}: {e}")
                continue
            if got != entry["params"]:
                bad.append(f"{m.name} {name}: cubin takes {got}, launcher passes {entry['params']}")
            target = re.search(r"^\.target\s+sm_(\d+)", elf, re.M)
            if not target or int(target.group(1)) != entry["arch"]:
                seen = target.group(0) if target else None
                bad.append(f"{m.name} {name}: target {seen}, want sm_{entry['arch']}")
    for b in bad:
        print("FAIL", b)
    print(f"{n} cubins checked, {len(bad)} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
