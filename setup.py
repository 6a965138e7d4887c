"""Build of the compiled core.

Always builds the C++ CPU extension ``structure_ops._C`` (csrc/cpu, ATen + at::parallel_for). Builds the
CUDA extension ``structure_ops._C_cuda`` from csrc/cuda when torch has CUDA and nvcc is found.

Knobs (environment):
  STRUCTURE_OPS_BUILD_CUDA = auto | 1 | 0   auto: CUDA iff torch.version.cuda and CUDA_HOME; 1: required
  TORCH_CUDA_ARCH_LIST                      CUDA architectures (torch's own knob; default here "8.0;9.0a"); the
                                            resulting targets are recorded in structure_ops/_build_info.json
  MAX_JOBS                                  parallel compile jobs (torch's own knob)
  STRUCTURE_OPS_DEBUG = 0 | 1               -O0 -g, no -DNDEBUG
Install with ``pip install --no-build-isolation -e .`` so the extension is built against the torch you run.
"""

import glob
import importlib.util
import json
import os
import platform
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - build-time message
    sys.exit(
        "structure-ops builds against an installed torch: install torch first, then run "
        "`pip install --no-build-isolation -e .` (see README). " + str(exc)
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
# Flags and CUDA-target helpers shared with tools/nvcc_check.py and the backend registry, loaded by path
# (the package is not importable before it is built).
_spec = importlib.util.spec_from_file_location("_structure_ops_build", os.path.join(ROOT, "structure_ops", "_build.py"))
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)
DEBUG = os.environ.get("STRUCTURE_OPS_DEBUG", "0") == "1"
CUDA_KNOB = os.environ.get("STRUCTURE_OPS_BUILD_CUDA", "auto").lower()
if CUDA_KNOB not in ("auto", "0", "1"):
    sys.exit(f"STRUCTURE_OPS_BUILD_CUDA must be auto, 1 or 0, got {CUDA_KNOB!r}")


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


cxx_flags = B.cxx_flags(DEBUG)
cpu_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) + ["csrc/module.cpp"]
ext_modules = [
    cpp_extension.CppExtension(
        "structure_ops._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
torch_has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
if CUDA_KNOB == "1" and not torch_has_cuda:
    sys.exit("STRUCTURE_OPS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME unset)")
build_cuda = CUDA_KNOB != "0" and torch_has_cuda and bool(cuda_sources)
cuda_targets = []
if build_cuda:
    # torch reads TORCH_CUDA_ARCH_LIST; without it, it would target only the GPUs of the build machine.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", B.DEFAULT_CUDA_ARCHS)
    # What the build will contain (sm_XY machine code, compute_XY PTX), recorded so that backend="auto"
    # can tell a GPU the build does not cover (it then moves on to Triton instead of failing).
    try:
        cuda_targets = B.targets_from_gencode(cpp_extension._get_cuda_arch_flags())
    except Exception:  # noqa: BLE001 - a private torch helper: fall back to reading the list ourselves
        cuda_targets = B.targets_from_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "structure_ops._C_cuda",
            cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            # -Xptxas=-v prints registers and spills of every kernel in the build log; no fast-math (exactness).
            extra_compile_args={"cxx": cxx_flags, "nvcc": B.nvcc_flags(DEBUG)},
        )
    )

# Build metadata, checked against the running torch at import (structure_ops/_ops.py warns on mismatch).
build_info = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_extension": build_cuda,
    "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
    "cuda_targets": cuda_targets,
    "nvcc_flags": B.nvcc_flags(DEBUG) if build_cuda else None,
    "debug": DEBUG,
    "python": platform.python_version(),
    "cxx_flags": cxx_flags,
}
tmp = os.path.join(ROOT, "structure_ops", "_build_info.json.tmp")
with open(tmp, "w") as f:
    json.dump(build_info, f, indent=1)
os.replace(tmp, os.path.join(ROOT, "structure_ops", "_build_info.json"))

setup(
    packages=find_packages(include=["structure_ops", "structure_ops.*"]),
    package_data={"structure_ops": ["_build_info.json", "train/zero_shot_suite.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
