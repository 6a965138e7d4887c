"""Exit 0 if this checkout's C++ extension is installed (editable), loads with the installed torch and is newer
than every source file it is built from; exit 1 otherwise (tools/setup.sh then rebuilds)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh() -> bool:
    spec = importlib.util.find_spec("structure_ops")
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != ROOT / "structure_ops":
        return False  # not installed, or installed from another folder
    built = sorted((ROOT / "structure_ops").glob("_C.*.so"))
    if not built:
        return False
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()] + [ROOT / "setup.py", ROOT / "pyproject.toml"]
    if built[0].stat().st_mtime < max(p.stat().st_mtime for p in sources if p.is_file()):
        return False
    try:
        import torch

        from structure_ops._ops import extension_error
    except Exception:
        return False
    if extension_error("_C"):
        return False
    # a CUDA torch with nvcc on the machine builds _C_cuda too: a build without it is stale
    return torch.version.cuda is None or shutil.which("nvcc") is None or any((ROOT / "structure_ops").glob("_C_cuda.*.so"))


if __name__ == "__main__":
    sys.exit(0 if fresh() else 1)
