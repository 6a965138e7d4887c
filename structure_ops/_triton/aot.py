"""Ahead-of-time compilation of every Triton kernel for real GPUs, on a machine without one.

``python -m structure_ops._triton.aot`` compiles each entry of the kernel modules' ``AOT_KERNELS`` lists
(a kernel, its signature, constexprs and optionally compile options such as num_warps; a module's
``AOT_OPTIONS`` apply to all its entries: representative fp32 and bf16 configurations) for sm_80 (A100) and
sm_90 (H100) with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))``, then runs Triton's bundled
ptxas with ``-v`` on the PTX to report registers and spills. Codegen errors that the interpreter cannot see
(layouts, shared memory, dot shapes) surface here; CI fails on any of them, and on spills with --no-spills.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time

MODULES = ("structure", "structure_flash", "clip", "knn")
TARGETS = (80, 90)


def _ptxas_usage(ptx: str, cc: int) -> dict:
    """Registers and spill bytes per kernel from ``ptxas -v`` (empty if ptxas is unavailable)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            out = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return {}
    text = out.stdout + out.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"regs": max(map(int, regs)) if regs else None,
            "spill_bytes": sum(int(a) + int(b) for a, b in spills) if spills else 0}


def compile_all(targets=TARGETS, modules=MODULES) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(f"structure_ops._triton.{mod_name}")
            entries = mod.AOT_KERNELS
        except Exception as e:  # a module that does not import is a failure of every kernel in it
            rows.append({"module": mod_name, "kernel": "-", "cc": "-", "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        module_options = getattr(mod, "AOT_OPTIONS", {})  # num_warps/num_stages the host launches use
        warps = getattr(mod, "AOT_NUM_WARPS", None)  # or one num_warps per entry
        for i, entry in enumerate(entries):
            kernel, signature, constexprs = entry[:3]
            options = {**module_options, **({"num_warps": warps[i]} if warps else {}),
                       **(entry[3] if len(entry) > 3 else {})}
            fn = getattr(kernel, "fn", kernel)
            config = ",".join(f"{k}={v}" for k, v in constexprs.items())
            dtypes = sorted({v for v in signature.values() if v.startswith("*")})
            for cc in targets:
                row = {"module": mod_name, "kernel": fn.__name__, "config": config, "pointers": dtypes, "cc": cc,
                       "options": options}
                t = time.perf_counter()
                try:
                    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                              target=GPUTarget("cuda", cc, 32), options=options or None)
                    ptx = compiled.asm["ptx"]
                    row.update(ok=True, seconds=round(time.perf_counter() - t, 2), wgmma="wgmma" in ptx,
                               mma="mma" in ptx, **_ptxas_usage(ptx, cc))
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-spills", action="store_true", help="fail on register spills too")
    p.add_argument("--cc", type=int, action="append", help="compute capability, e.g. 90 (repeatable; default 80 and 90)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = compile_all(tuple(a.cc or TARGETS))
    print(f"{'kernel':38s} {'config':44s} {'cc':>3s} {'ok':>3s} {'s':>5s} {'regs':>5s} {'spill B':>7s} {'tensor cores'}")
    for r in rows:
        if not r["ok"]:
            print(f"{r['module'] + '.' + r['kernel']:38s} {r.get('config', ''):44.44s} {r['cc']!s:>3s} FAIL  {r['error']}")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
        print(f"{r['module'] + '.' + r['kernel']:38s} {r['config']:44.44s} {r['cc']:>3d} {'ok':>3s} {r['seconds']:5.1f} "
              f"{r.get('regs') or '?':>5} {r.get('spill_bytes', '?'):>7} {tc}")
    failed = [r for r in rows if not r["ok"]]
    spilled = [r for r in rows if r["ok"] and r.get("spill_bytes")]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} compiled; {len(spilled)} with register spills")
    if failed or (a.no_spills and spilled):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
