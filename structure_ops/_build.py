"""Build facts shared by setup.py, tools/nvcc_check.py and the backend registry (pure Python, no torch import).

setup.py loads this file by path (the package itself is not importable before it is built), so it must stay
free of imports from structure_ops and of torch.

* The compiler flags of the extensions (``cxx_flags``, ``nvcc_flags``): tools/nvcc_check.py compiles the CUDA
  sources with the same flags as the real build, plus what torch's BuildExtension adds.
* The CUDA targets a build contains (``targets_from_gencode``: "sm_90a" = machine code, "compute_90" = PTX),
  recorded by setup.py in structure_ops/_build_info.json as ``cuda_targets``.
* Whether those targets run on a GPU of a given compute capability (``covers``), so that ``backend="auto"``
  moves on to Triton instead of failing on a GPU the CUDA build lacks (e.g. an sm_100 GPU with a 9.0a build).
"""

from __future__ import annotations

import re

DEFAULT_CUDA_ARCHS = "8.0;9.0a"  # A100 and H100/H200 (9.0a: the Hopper-specific instructions)
# The C++ standard torch's BuildExtension gives nvcc on the GPU machine (torch 2.11: -std=c++17; torch >= 2.13
# defaults to c++20, and its headers then use C++20 features, so setup.py leaves the choice to torch). The
# sources must compile with both; tools/nvcc_check.py (CI) checks the older, stricter one by default.
CUDA_STD = "c++17"


def cxx_flags(debug: bool) -> list[str]:
    """Host compiler flags of both extensions."""
    flags = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # -fno-trapping-math lets GCC if-convert the selects of csrc/common/fastmath.h so the fp32 row loops
    # vectorize (torch itself builds with it); NaN/Inf semantics are unchanged (no -ffast-math).
    return flags + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def nvcc_flags(debug: bool) -> list[str]:
    """nvcc flags that setup.py adds to torch's own (COMMON_NVCC_FLAGS, -fPIC, the -gencode list, -std).

    -Xptxas=-v prints registers and spills of every kernel into the build log; no fast-math (exactness)."""
    return (["-O0", "-G"] if debug else ["-O3", "-lineinfo"]) + ["-Xptxas=-v"]


_GENCODE = re.compile(r"arch=compute_(\w+),code=(\[?[\w,]+\]?)")


def targets_from_gencode(flags: list[str]) -> list[str]:
    """["sm_80", "sm_90a", "compute_90", ...] from nvcc ``-gencode=arch=compute_XX,code=...`` flags
    (what torch.utils.cpp_extension._get_cuda_arch_flags makes of TORCH_CUDA_ARCH_LIST)."""
    out: list[str] = []
    for flag in flags:
        m = _GENCODE.search(flag)
        if not m:
            continue
        for code in m.group(2).strip("[]").split(","):
            if code and code not in out:
                out.append(code)
    return out


def targets_from_arch_list(arch_list: str) -> list[str] | None:
    """The same from a TORCH_CUDA_ARCH_LIST string of numbers ("8.0;9.0a+PTX"); None if it holds anything
    else (named architectures such as "Hopper" are torch's to expand)."""
    out: list[str] = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item)
        if not m:
            return None
        code = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        for t in [f"sm_{code}"] + ([f"compute_{code}"] if m.group(4) else []):
            if t not in out:
                out.append(t)
    return out


def _parse(target: str) -> tuple[str, int, int, str] | None:
    """"sm_90a" -> ("sm", 9, 0, "a"); "compute_86" -> ("compute", 8, 6, ""); None if unrecognized."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)


def runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``target`` runs on a GPU of compute capability ``capability``.

    Machine code (sm_XY) runs on the same major version with a minor version ≥ Y; arch-specific code
    (sm_XYa, e.g. sm_90a) only on exactly X.Y; family code (sm_XYf) on the same major version, minor ≥ Y.
    PTX (compute_XY) is compiled by the driver for any capability ≥ X.Y (compute_XYa: exactly X.Y).
    """
    parsed = _parse(target)
    if parsed is None:
        return False
    kind, major, minor, suffix = parsed
    cap = (int(capability[0]), int(capability[1]))
    if suffix == "a":
        return cap == (major, minor)
    if kind == "compute" and suffix == "":
        return cap >= (major, minor)
    return cap[0] == major and cap[1] >= minor


def covers(targets: list[str], capability: tuple[int, int]) -> bool:
    """Whether any of ``targets`` runs on a GPU of ``capability``."""
    return any(runs_on(t, capability) for t in targets)


def sm_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> "sm_90", (10, 0) -> "sm_100"."""
    return f"sm_{int(capability[0])}{int(capability[1])}"


def arch_mismatch(targets: list[str] | None, capability: tuple[int, int]) -> str | None:
    """"structure_ops._C_cuda was built for sm_90a, this GPU is sm_100 (...)" when none of ``targets`` runs
    on a GPU of ``capability``; None when one does, or when the targets are unknown (None or empty)."""
    if not targets or covers(targets, capability):
        return None
    major, minor = int(capability[0]), int(capability[1])
    return (f"structure_ops._C_cuda was built for {', '.join(targets)}, this GPU is {sm_name(capability)} "
            f"(rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")
