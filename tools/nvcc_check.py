"""Compile every CUDA source of csrc/cuda with nvcc the way the GPU machine's build does, without a GPU and
against the headers of whatever torch is installed (the CPU wheel works; see docs/building.md), and report
registers and spills per kernel from ``-Xptxas -v``. CI runs it; any compile error fails the run (and spills
with --no-spills).

    python tools/nvcc_check.py [--arch-list "8.0;9.0a"] [--std c++17] [--jobs 2] [--no-spills | --no-spills-on sm_90a] [files...]

The command mirrors ``pip install --no-build-isolation -e .`` with STRUCTURE_OPS_BUILD_CUDA=1 on the GPU machine
(torch 2.11): torch's own nvcc flags (cpp_extension.COMMON_NVCC_FLAGS, -fPIC, the -gencode list torch makes of
TORCH_CUDA_ARCH_LIST, -DTORCH_API_INCLUDE_EXTENSION_H, -DTORCH_EXTENSION_NAME), the flags setup.py adds
(structure_ops/_build.py: nvcc_flags) and -std=c++17, torch 2.11's standard for extensions (torch >= 2.13 uses
c++20; --std c++20 checks that). The CPU torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h:
-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE stands in for it (only when it is missing), and the sources avoid
ATen/cuda/CUDAContext.h (c10/cuda/CUDAStream.h and CUDAGuard.h are enough). The real build, link and run
happen with a CUDA torch on the GPU machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import importlib.util
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


def _build_module():
    spec = importlib.util.spec_from_file_location("_structure_ops_build", os.path.join(ROOT, "structure_ops", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def arch_flags(arch_list: str) -> list[str]:
    """The -gencode flags torch's build makes of TORCH_CUDA_ARCH_LIST=arch_list."""
    from torch.utils import cpp_extension

    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension._get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old


def flags(arch_list: str, std: str) -> list[str]:
    """Everything but the nvcc path, the source and the output: includes, defines, torch's and setup.py's flags."""
    import torch
    from torch.utils import cpp_extension

    includes = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C_cuda"]
    torch_inc = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # the CPU wheel
    return ([f"-I{p}" for p in includes] + defines + list(cpp_extension.COMMON_NVCC_FLAGS)
            + ["--compiler-options", "-fPIC"] + _build_module().nvcc_flags(False) + arch_flags(arch_list) + [f"-std={std}"])


def command(nvcc: str, src: str, common: list[str], out: str) -> list[str]:
    return [nvcc, "-c", src, "-o", out, *common]


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


def compile_one(nvcc: str, src: str, common: list[str], tmp: str) -> dict:
    out = os.path.join(tmp, os.path.basename(src) + ".o")
    t = time.perf_counter()
    proc = subprocess.run(command(nvcc, src, common, out), capture_output=True, text=True)
    return {"file": os.path.relpath(src, ROOT), "ok": proc.returncode == 0, "seconds": time.perf_counter() - t,
            "log": proc.stdout + proc.stderr, "kernels": parse_ptxas(proc.stdout + proc.stderr)}


def _legacy_arch(a: str) -> str:
    """--arch 90a -> "9.0a" (the TORCH_CUDA_ARCH_LIST spelling)."""
    m = re.fullmatch(r"(\d+)(\d)([af]?)", a)
    if not m:
        raise SystemExit(f"--arch takes e.g. 80 or 90a, got {a!r}")
    return f"{m.group(1)}.{m.group(2)}{m.group(3)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="sources (default: csrc/cuda/*.cu and *.cpp)")
    p.add_argument("--arch-list", help='TORCH_CUDA_ARCH_LIST to mirror (default: setup.py\'s, "8.0;9.0a")')
    p.add_argument("--arch", action="append", help="e.g. 80, 90a (repeatable; shorthand for --arch-list)")
    p.add_argument("--std", default=None, help="C++ standard (default c++17: what the GPU machine's torch 2.11 uses)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-spills", action="store_true", help="fail on any register spill")
    p.add_argument("--no-spills-on", action="append", default=[], metavar="TARGET",
                   help="fail on register spills of this target only, e.g. sm_90a (repeatable); others are reported")
    a = p.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 1
    files = a.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not files:
        print("no CUDA sources in csrc/cuda", file=sys.stderr)
        return 1
    build = _build_module()
    arch_list = a.arch_list or (";".join(_legacy_arch(x) for x in a.arch) if a.arch else build.DEFAULT_CUDA_ARCHS)
    common = flags(arch_list, a.std or build.CUDA_STD)
    print("nvcc " + " ".join(command(nvcc, "<source>", common, "<object>")[1:]), flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        results = list(pool.map(lambda f: compile_one(nvcc, f, common, tmp), files))
    failed, spilled = [], []
    for r in results:
        print(f"{r['file']}: {'ok' if r['ok'] else 'FAILED'} ({r['seconds']:.0f} s)")
        if not r["ok"]:
            failed.append(r)
            print(r["log"][-6000:])
        for k in r["kernels"]:
            flag = "  SPILLS" if k["spill_bytes"] else ""
            print(f"    {k['arch']:7s} {k['regs'] if k['regs'] is not None else '?':>4} regs {k['spill_bytes']:6d} B spilled  {k['kernel']}{flag}")
            if k["spill_bytes"] and (a.no_spills or k["arch"] in a.no_spills_on):
                spilled.append(k)
    targets = build.targets_from_gencode(common)
    all_spills = sum(1 for r in results for k in r["kernels"] if k["spill_bytes"])
    print(f"\n{len(results) - len(failed)}/{len(results)} sources compiled for {', '.join(targets)} with -std={a.std or build.CUDA_STD}; "
          f"{all_spills} kernel builds with register spills"
          + (f", {len(spilled)} of them on a target that must not spill" if (a.no_spills or a.no_spills_on) else ""))
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
