"""Compile every CUDA source of csrc/cuda with nvcc for sm_80 and sm_90a, without a GPU and against the
headers of whatever torch is installed (the CPU wheel works; see docs/building.md), and report registers and
spills per kernel from ``-Xptxas -v``. CI runs it; any compile error fails the run (and spills with
--no-spills).

    python tools/nvcc_check.py [--arch 80 --arch 90a] [--jobs 2] [--no-spills] [files...]

The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h: -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in
for it, and the sources avoid ATen/cuda/CUDAContext.h (c10/cuda/CUDAStream.h and CUDAGuard.h are enough).
The real build, link and run happen with a CUDA torch on the GPU machine (pip install -e .).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand):
            return cand
    return None


def command(nvcc: str, src: str, archs: list[str], out: str) -> list[str]:
    import torch

    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-std=c++20", "-O3", "-c", src, "-o", out, *gencode, "-Xptxas", "-v",
            "-I", inc, "-I", os.path.join(inc, "torch", "csrc", "api", "include"), "-I", sysconfig.get_paths()["include"],
            "-I", os.path.join(ROOT, "csrc"), "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C_cuda"]


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: (_short(d) if d else n) for n, d in zip(names, out, strict=False)}


def _short(demangled: str) -> str:
    """'void ns::(anonymous namespace)::kern<float, 4>(float*, int)' -> 'ns::kern<float, 4>'."""
    text = demangled.removeprefix("void ")
    if text.endswith(")"):  # drop the parameter list: the last balanced (...) group
        depth = 0
        for i in range(len(text) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(text[i], 0)
            if depth == 0:
                text = text[:i]
                break
    return text.replace("(anonymous namespace)::", "")


def parse_ptxas(text: str) -> list[dict]:
    """[{kernel, arch, regs, spill_bytes}] from ptxas -v output (one entry per compiled entry function)."""
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": None, "spill_bytes": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
    names = _demangle(sorted({r["kernel"] for r in rows}))
    for r in rows:
        r["kernel"] = names.get(r["kernel"], r["kernel"])
    return rows


def compile_one(nvcc: str, src: str, archs: list[str], tmp: str) -> dict:
    out = os.path.join(tmp, os.path.basename(src) + ".o")
    t = time.perf_counter()
    proc = subprocess.run(command(nvcc, src, archs, out), capture_output=True, text=True)
    return {"file": os.path.relpath(src, ROOT), "ok": proc.returncode == 0, "seconds": time.perf_counter() - t,
            "log": proc.stdout + proc.stderr, "kernels": parse_ptxas(proc.stdout + proc.stderr)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="sources (default: csrc/cuda/*.cu and *.cpp)")
    p.add_argument("--arch", action="append", help="e.g. 80, 90a (repeatable; default 80 and 90a)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-spills", action="store_true")
    a = p.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 1
    files = a.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not files:
        print("no CUDA sources in csrc/cuda", file=sys.stderr)
        return 1
    archs = a.arch or ["80", "90a"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        results = list(pool.map(lambda f: compile_one(nvcc, f, archs, tmp), files))
    failed, spilled = [], []
    for r in results:
        print(f"{r['file']}: {'ok' if r['ok'] else 'FAILED'} ({r['seconds']:.0f} s)")
        if not r["ok"]:
            failed.append(r)
            print(r["log"][-6000:])
        for k in r["kernels"]:
            flag = "  SPILLS" if k["spill_bytes"] else ""
            print(f"    {k['arch']:7s} {k['regs'] if k['regs'] is not None else '?':>4} regs {k['spill_bytes']:6d} B spilled  {k['kernel']}{flag}")
            if k["spill_bytes"]:
                spilled.append(k)
    print(f"\n{len(results) - len(failed)}/{len(results)} sources compiled for {', '.join('sm_' + x for x in archs)}; "
          f"{len(spilled)} kernel builds with register spills")
    return 1 if failed or (a.no_spills and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
