"""Ahead-of-time compilation of every Triton kernel launch the host code can make, on a machine without a GPU.

``python -m structure_ops._triton.aot [--targets 90] [--report-targets 80] [--no-spills] [--jobs N]``

The configurations come from the kernel modules themselves: each module's ``aot_configs()`` runs the module's
own launch/config functions (the ones its host code calls to pick block sizes, num_warps and constexprs) over
every supported dtype (fp16, bf16, fp32, fp64 where the module takes it), float32 matmul precision (highest /
high / medium), option (similarity, divergence, ...) and gradient flag, and returns the deduplicated
(kernel, signature, constexprs, options) list: nothing here is a hand-picked list. A module that declares autotune
spaces (``_common.TuneSpace``) also returns, from ``aot_space_configs()``, EVERY config of each space for every
variant it can launch (``_common.space_aot_entries``): the whole space is compiled, not only the heuristic's choice,
so that no candidate the autotuner can pick on a GPU escapes the checks. Entries are deduplicated (the heuristic's
choice is also a space config) and compiled by ``--jobs`` worker processes. Each entry is compiled with
``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` and Triton's bundled ptxas is run with ``-v`` on the PTX
for registers, spill bytes and stack frame. Codegen errors that the interpreter cannot see (layouts, shared
memory, dot shapes) fail the run; with ``--no-spills`` any spill (or stack frame) on a ``--targets`` target fails
it too. ``--report-targets`` compiles and reports more targets without failing on their spills. ``--json PATH``
writes the rows (atomically).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

MODULES = ("structure", "structure_flash", "clip", "knn", "siglip")
TARGETS = (90,)


def _ptxas_usage(ptx: str, cc: int) -> dict:
    """Registers, spill bytes and stack frame bytes (max over the PTX's functions) from ``ptxas -v``; empty when
    ptxas is unavailable."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            out = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, timeout=300)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return {}
    text = out.stdout + out.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.findall(r"(\d+) bytes stack frame", text)
    if not regs:
        return {}
    return {"regs": max(map(int, regs)),
            "spill_bytes": sum(int(a) + int(b) for a, b in spills),
            "stack_bytes": max(map(int, stack)) if stack else 0}  # fmt: skip


def _entry_key(e: tuple) -> tuple:
    kernel, sig, cst, opts = e
    return (_kernel_name(kernel), tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in cst.items())),
            tuple(sorted(opts.items())))  # fmt: skip


def module_entries(mod_name: str) -> list[tuple]:
    """(kernel, signature, constexprs, options) of a kernel module: its ``aot_configs()`` (the launch functions) and,
    when it declares autotune spaces, ``aot_space_configs()`` (every config of every space), deduplicated."""
    mod = importlib.import_module(f"structure_ops._triton.{mod_name}")
    if hasattr(mod, "aot_configs"):
        entries = [tuple(e) + ({},) * (4 - len(e)) for e in mod.aot_configs()]
        entries += [tuple(e) for e in getattr(mod, "aot_space_configs", list)()]
        seen, out = set(), []
        for e in entries:
            k = _entry_key(e)
            if k not in seen:
                seen.add(k)
                out.append(e)
        return out
    # legacy: a static AOT_KERNELS list (+ module-wide AOT_OPTIONS or per-entry AOT_NUM_WARPS)
    module_options = getattr(mod, "AOT_OPTIONS", {})
    warps = getattr(mod, "AOT_NUM_WARPS", None)
    out = []
    for i, e in enumerate(mod.AOT_KERNELS):
        opts = {**module_options, **({"num_warps": warps[i]} if warps else {}), **(e[3] if len(e) > 3 else {})}
        out.append((e[0], e[1], e[2], opts))
    return out


def _kernel_name(kernel) -> str:
    return getattr(kernel, "fn", kernel).__name__


def _compile_one(job: tuple) -> dict:
    """Compile one (module, kernel name, signature, constexprs, options, cc, index) job (runs in a worker process;
    the entry travels with the job, so a worker never re-derives the list)."""
    os.environ.pop("TRITON_INTERPRET", None)
    mod_name, kname, signature, constexprs, options, cc, index = job
    row = {"module": mod_name, "kernel": kname, "index": index, "cc": cc,
           "config": ",".join(f"{k}={v}" for k, v in constexprs.items()),
           "pointers": sorted({v for v in signature.values() if v.startswith("*")}), "options": options}  # fmt: skip
    t = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = getattr(importlib.import_module(f"structure_ops._triton.{mod_name}"), kname)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", cc, 32), options=options or None)  # fmt: skip
        ptx = compiled.asm["ptx"]
        row.update(ok=True, wgmma="wgmma" in ptx, mma="mma" in ptx, **_ptxas_usage(ptx, cc))
    except Exception as e:  # a codegen error is a failed row, reported with the others
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    row["seconds"] = round(time.perf_counter() - t, 2)
    return row


def compile_all(targets=TARGETS, modules=MODULES, jobs: int | None = None) -> list[dict]:
    """Compile every entry of ``modules`` for every target in ``targets`` with ``jobs`` worker processes."""
    work, rows = [], []
    for mod_name in modules:
        try:
            entries = module_entries(mod_name)
        except Exception as e:  # a module that does not import is a failure of every kernel in it
            rows.append({"module": mod_name, "kernel": "-", "cc": "-", "ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        work += [(mod_name, _kernel_name(k), dict(sig), dict(cst), dict(opts), cc, i)
                 for cc in targets for i, (k, sig, cst, opts) in enumerate(entries)]  # fmt: skip
    jobs = max(1, jobs or os.cpu_count() or 1)
    if jobs == 1:
        rows += [_compile_one(w) for w in work]
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked CUDA/triton state
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            rows += list(pool.map(_compile_one, work, chunksize=1))
    return rows


def _write_json(path: str, payload) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _targets(values) -> tuple[int, ...]:
    out = []
    for v in values or ():
        out += [int(x.replace("sm_", "")) for x in str(v).split(",") if x.strip()]
    return tuple(dict.fromkeys(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", action="append", help="compute capabilities checked, e.g. 90 or 80,90 (default 90)")
    p.add_argument("--cc", action="append", help="alias of --targets")
    p.add_argument("--report-targets", action="append", default=[], help="also compile and report these (spills "
                   "never fail the run), e.g. 80")
    p.add_argument("--no-spills", action="store_true", help="fail on any register spill / stack frame (--targets)")
    p.add_argument("--modules", default=",".join(MODULES), help=f"comma list (default {','.join(MODULES)})")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    p.add_argument("--json", help="write every row to this JSON file")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    checked = _targets((a.targets or []) + (a.cc or [])) or TARGETS
    reported = tuple(t for t in _targets(a.report_targets) if t not in checked)
    modules = tuple(m for m in a.modules.split(",") if m)
    t0 = time.perf_counter()
    rows = compile_all(checked + reported, modules, a.jobs)
    wall = time.perf_counter() - t0
    print(f"{'kernel':34s} {'config':60s} {'cc':>3s} {'ok':>4s} {'s':>5s} {'regs':>5s} {'spill B':>7s} {'stack':>5s} tc")
    for r in rows:
        name = f"{r['module']}.{r['kernel']}"
        if not r["ok"]:
            print(f"{name:34s} {r.get('config', ''):60.60s} {r['cc']!s:>3s} FAIL  {r['error']}")
            continue
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
        warps = r["options"].get("num_warps", 4)
        cfg = f"{r['pointers'][0] if r['pointers'] else ''} w{warps} {r['config']}"
        print(f"{name:34s} {cfg:60.60s} {r['cc']:>3d} {'ok':>4s} {r['seconds']:5.1f} {r.get('regs') or '?':>5} "
              f"{r.get('spill_bytes', '?'):>7} {r.get('stack_bytes', '?'):>5} {tc}")  # fmt: skip
    failed = [r for r in rows if not r["ok"]]
    bad = []
    print("\nsummary (cc: configs, compiled, with spills/stack, max regs):")
    for cc in checked + reported:
        mine = [r for r in rows if r["cc"] == cc]
        ok = [r for r in mine if r["ok"]]
        unknown = [r for r in ok if "regs" not in r]
        spilled = [r for r in ok if r.get("spill_bytes") or r.get("stack_bytes")]
        regs = max((r.get("regs") or 0 for r in ok), default=0)
        role = "checked" if cc in checked else "report only"
        print(f"  sm_{cc} ({role}): {len(mine)} configs, {len(ok)} compiled, {len(spilled)} with spills/stack "
              f"(max {max((r.get('spill_bytes', 0) for r in ok), default=0)} B spill, "
              f"{max((r.get('stack_bytes', 0) for r in ok), default=0)} B stack), {len(unknown)} without ptxas "
              f"report, max {regs} registers")  # fmt: skip
        if cc in checked and a.no_spills:
            bad += spilled + unknown
    for m in modules:
        n = len([r for r in rows if r["module"] == m and r["cc"] == (checked + reported)[0]])
        print(f"  {m}: {n} configurations per target")
    print(f"wall time {wall:.1f} s with {a.jobs or os.cpu_count()} jobs")
    if a.json:
        _write_json(a.json, {"targets": checked, "report_targets": reported, "wall_s": round(wall, 1), "rows": rows})
    if failed:
        print(f"FAILED: {len(failed)} configurations did not compile")
    if bad:
        print(f"FAILED (--no-spills): {len(bad)} configurations spill, use a stack frame or were not checked by ptxas")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
