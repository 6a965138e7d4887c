"""A fresh process with triton made unimportable: the package imports and the CPU losses run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import structure_ops

PACKAGE_DIR = os.path.dirname(os.path.abspath(structure_ops.__file__))

SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc
    import importlib.machinery
    import json
    import os
    import sys
    import traceback

    PACKAGE_DIR = sys.argv[1]
    attempts = []


    class _BlockedLoader(importlib.abc.Loader):
        def create_module(self, spec):
            # who asked? the innermost frame outside the import machinery and this script
            frames = [
                f.filename for f in traceback.extract_stack()
                if not f.filename.startswith("<frozen") and f.filename != __file__ and "importlib" not in f.filename
            ]
            attempts.append({"name": spec.name, "importer": frames[-1] if frames else "?"})
            raise ImportError(f"{spec.name} is blocked by the test")

        def exec_module(self, module):  # pragma: no cover - create_module always raises
            raise ImportError("blocked")


    class _BlockTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                return importlib.machinery.ModuleSpec(name, _BlockedLoader())
            return None


    sys.meta_path.insert(0, _BlockTriton())

    import torch
    import structure_ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    z = torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = structure_ops.structure_loss(x, z, temperature=0.2)
    loss.backward()
    ref = structure_ops.reference.structure_loss(x, z.detach(), temperature=0.2)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    clip = structure_ops.clip_loss(z.detach(), x[:, :3], s)
    clip.backward()
    print(json.dumps({
        "backend": structure_ops._backends.select("structure_loss", "auto", (x, z)),
        "loss": loss.item(),
        "ref": ref.item(),
        "grad_finite": bool(torch.isfinite(z.grad).all()),
        "clip_finite": bool(torch.isfinite(clip)) and bool(torch.isfinite(s.grad)),
        "triton_modules": sorted(m for m in sys.modules if m == "triton" or m.startswith("triton.")),
        "attempts_from_package": [a for a in attempts if a["importer"].startswith(PACKAGE_DIR)],
        "attempts": attempts,
    }))
    """
)


def test_import_and_run_without_triton(tmp_path):
    script = tmp_path / "no_triton.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRUCTURE_OPS_")}
    proc = subprocess.run(
        [sys.executable, str(script), PACKAGE_DIR], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["triton_modules"] == []
    assert result["attempts_from_package"] == [], result["attempts"]
    assert result["backend"] == "cpu"
    assert abs(result["loss"] - result["ref"]) <= 1e-12 * abs(result["ref"])
    assert result["grad_finite"] and result["clip_finite"]


def test_import_does_not_touch_cuda(tmp_path):
    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('CUDA queried at import'))\n"
        "torch.cuda.device_count = lambda: (_ for _ in ()).throw(AssertionError('CUDA queried at import'))\n"
        "import structure_ops\n"
        "print('ok', structure_ops.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok ")
