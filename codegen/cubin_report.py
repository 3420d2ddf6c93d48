"""What each stored cubin asks of the GPU, read without one (`braze inspect --kernels`).

For every kernel specialisation of an artifact and every target it was compiled for:
registers per thread, spilled bytes (STACK + LOCAL: a kernel that spills reads and writes
local memory, which at decode sizes costs as much as its real traffic), shared memory,
the resident warps per SM those allow (occupancy), and the global loads and stores by
width as the SASS issues them (128-bit loads are what a bandwidth-bound kernel wants;
16-bit ones on a contiguous bf16 tensor mean a missed divisibility hint).

The numbers come from `cuobjdump`, which Triton's NVIDIA backend ships beside ptxas, so
any host that can compile the cubins can read them. The occupancy model is CUDA's
(the occupancy calculator's rules): registers are allocated per warp in units of 256,
shared memory per block with 1 KiB reserved by the system, and the per-SM limits of each
architecture below.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Per-SM limits: registers, resident warps, resident blocks, shared memory usable by
# blocks (bytes). sm_80: A100 (164 KiB of the 192 KiB L1/shared); sm_90: H100/H200
# (228 KiB). Other sm_8x parts have fewer warps per SM (48) and less shared memory.
SM_LIMITS = {
    "sm_80": {"regs": 65536, "warps": 64, "blocks": 32, "shared": 164 * 1024},
    "sm_86": {"regs": 65536, "warps": 48, "blocks": 16, "shared": 100 * 1024},
    "sm_89": {"regs": 65536, "warps": 48, "blocks": 24, "shared": 100 * 1024},
    "sm_90": {"regs": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024},
}
_RESERVED_SHARED = 1024       # per block, taken by the system on sm_80 and later

_RES = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
# LDG.E.128, LDG.E.64, LDG.E (32-bit), LDG.E.U16 / .S16 / .U8 / .S8, LDG.E.EL.128 ...
_MEM = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])")
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def cuobjdump() -> str | None:
    """The cuobjdump of the installed Triton's NVIDIA backend (None where it has none)."""
    try:
        import triton
    except ImportError:
        return None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(tool) if tool.exists() and os.access(tool, os.X_OK) else None


def _width(suffixes: str) -> int:
    for s in suffixes.split("."):
        if s in _WIDTH:
            return _WIDTH[s]
    return 32


@dataclass
class CubinReport:
    """One cubin's resources. `loads`/`stores`/`async_copies`: {bits: instructions}."""
    regs: int
    spill_bytes: int
    static_shared: int
    loads: dict[int, int] = field(default_factory=dict)
    stores: dict[int, int] = field(default_factory=dict)
    async_copies: dict[int, int] = field(default_factory=dict)


def read_cubin(path: str | Path, tool: str | None = None, sass: bool = True) -> CubinReport:
    """Registers, spills and memory instructions of one cubin (one kernel), by cuobjdump.
    `sass=False`: registers, spills and shared memory alone (`-res-usage`, ~2 ms a cubin);
    the memory instructions need the disassembly (`-sass`, ~300 ms a cubin), and are
    left empty."""
    tool = tool or cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump: install triton with its NVIDIA backend "
                           "(pip install triton) to read cubins")
    res = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True)
    found = {k: int(v) for k, v in _RES.findall(res.stdout)}
    if res.returncode != 0 or "REG" not in found:
        raise RuntimeError(f"cuobjdump could not read {path}: "
                           f"{(res.stderr or res.stdout).strip()[:200]}")
    out = CubinReport(regs=found["REG"], spill_bytes=found.get("STACK", 0) + found.get("LOCAL", 0),
                      static_shared=found.get("SHARED", 0))
    if not sass:
        return out
    text = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True).stdout
    for op, suffixes in _MEM.findall(text):
        into = {"LDG": out.loads, "STG": out.stores, "LDGSTS": out.async_copies}[op]
        w = _width(suffixes)
        into[w] = into.get(w, 0) + 1
    return out


def occupancy(target: str, regs: int, shared: int, num_warps: int) -> dict | None:
    """Resident blocks and warps per SM for a kernel of `num_warps` warps using `regs`
    registers per thread and `shared` bytes of shared memory per block, and what limits
    them (None for a target without limits here)."""
    lim = SM_LIMITS.get(target)
    if lim is None or num_warps <= 0:
        return None
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by = {"warps": lim["warps"] // num_warps,
          "registers": (lim["regs"] // regs_per_warp) // num_warps,
          "blocks": lim["blocks"]}
    if shared:
        by["shared memory"] = lim["shared"] // (shared + _RESERVED_SHARED)
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    return {"blocks": blocks, "warps": blocks * num_warps,
            "fraction": blocks * num_warps / lim["warps"], "limited_by": limiter}


def kernel_rows(root: Path, manifest: dict, tool: str | None = None,
                sass: bool = True) -> list[dict]:
    """One row per stored cubin of the artifact at `root`: variant, spec, target, warps,
    stages, registers, spills, shared memory, occupancy and memory instruction widths
    (those only with `sass`: see read_cubin)."""
    tool = tool or cuobjdump()
    rows = []
    for vid, k in sorted((manifest.get("kernels") or {}).items()):
        for target, by_key in sorted(k.get("cubins", {}).items()):
            for key, entry in sorted(by_key.items()):
                r = read_cubin(root / entry["cubin"], tool, sass)
                shared = max(int(entry.get("shared", 0)), r.static_shared)
                warps = int(k.get("num_warps", 4))
                rows.append({
                    "variant": vid, "spec": key, "target": target, "fn": k["fn"],
                    "num_warps": warps, "num_stages": int(k.get("num_stages", 0)),
                    "regs": r.regs, "spill_bytes": r.spill_bytes, "shared": shared,
                    "occupancy": occupancy(target, r.regs, shared, warps),
                    "loads": r.loads, "stores": r.stores, "async_copies": r.async_copies})
    return rows


def summary_line(rows: list[dict]) -> str:
    """One line for `braze compile`'s log: the heaviest cubin's registers and shared memory,
    and every cubin that spills (a kernel developer's first warning, no GPU needed)."""
    if not rows:
        return "cubin resources: no cubins"
    regs = max(rows, key=lambda r: r["regs"])
    shared = max(rows, key=lambda r: r["shared"])
    line = (f"cubin resources: up to {regs['regs']} registers a thread ({regs['variant']}, "
            f"{regs['target']}), up to {shared['shared'] / 1024:.0f} KiB shared memory "
            f"({shared['variant']}); ")
    spills = _spills(rows)
    return line + ("WARNING: " + spills if spills else "none spills registers")


def _spills(rows: list[dict]) -> str:
    """'N spill registers to local memory: variant@spec (target, B), ...', or '' if none."""
    spills = [r for r in rows if r["spill_bytes"]]
    if not spills:
        return ""
    return f"{len(spills)} spill registers to local memory: " + ", ".join(
        f"{r['variant']}@{r['spec']} ({r['target']}, {r['spill_bytes']} B)" for r in spills)


def _widths(d: dict[int, int]) -> str:
    return " ".join(f"{n}x{b}" for b, n in sorted(d.items(), reverse=True)) or "-"


def format_rows(rows: list[dict]) -> str:
    """A table of `kernel_rows`, with a line per kernel that spills."""
    head = ("| kernel | spec | target | warps | regs | spill B | shared B | warps/SM "
            "| global loads (n x bits) | cp.async | stores |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        occ = r["occupancy"]
        occ_s = (f"{occ['warps']} ({occ['fraction']:.0%}, {occ['limited_by']})"
                 if occ else "?")
        lines.append(f"| {r['variant']} | {r['spec']} | {r['target']} | {r['num_warps']} "
                     f"| {r['regs']} | {r['spill_bytes']} | {r['shared']} | {occ_s} "
                     f"| {_widths(r['loads'])} | {_widths(r['async_copies'])} "
                     f"| {_widths(r['stores'])} |")
    lines.append("")
    lines.append(f"{len(rows)} cubins; " + (_spills(rows) or "none spills registers"))
    return "\n".join(lines)
