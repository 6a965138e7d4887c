"""``python -m structure_ops.info``: versions, devices, built extensions and, per op, which backends run.

This is the first thing to run when something does not work: it shows why each backend is (not) usable
for CPU tensors and, when a GPU is visible, for CUDA tensors.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

import torch

from . import __version__
from ._backends import AUTO_ORDER, OPS, _select, _signature, availability, cuda_arch_reason
from ._ops import build_info, cuda_targets, extension_error


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - metadata may be missing for vendored installs
        return "installed (version unknown)"


def report() -> str:
    lines = [
        f"structure-ops {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {_version('triton')}, numpy {_version('numpy')}",
        f"CPU threads: {torch.get_num_threads()}; float32 matmul precision: {torch.get_float32_matmul_precision()}",
    ]
    cuda = torch.cuda.is_available()
    lines.append(f"build: {build_info() or 'no build metadata (extension not built from this tree)'}")
    for ext in ("_C", "_C_cuda"):
        err = extension_error(ext)
        lines.append(f"extension structure_ops.{ext}: " + ("loaded" if err is None else err))
    targets = cuda_targets()
    lines.append(f"CUDA build targets: {', '.join(targets) if targets else 'none recorded'}")
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
            if targets and extension_error("_C_cuda") is None:
                why = cuda_arch_reason(i)
                lines.append("    the CUDA build runs on it" if why is None else f"    {why}")
    else:
        lines.append("GPU: none visible")
    lines.append(f"auto order: {' > '.join(AUTO_ORDER)}")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for device in devices:
        sample = (torch.empty(2, 2, device=device),)
        for op in OPS:
            devs, dtypes = _signature(sample)
            index = 0 if device == "cuda" else None
            lines.append(f"[{op} on {device} float32] auto -> {_select(op, 'auto', devs, dtypes, index)}")
            for name, why in availability(op, sample).items():
                lines.append(f"    {name:9s} " + ("OK" if not why else "no: " + "; ".join(why)))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
