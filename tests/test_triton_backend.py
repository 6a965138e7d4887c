"""The Triton backend through the public API: registry, op boundary (opcheck, torch.compile), autograd.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); the registry routes CPU tensors to Triton only when backend="triton" is explicit. The
kernels' own oracle tests live in test_triton_structure.py, test_triton_flash.py, test_triton_clip_knn.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import structure_ops as so  # noqa: E402
from structure_ops import _backends  # noqa: E402
from structure_ops import reference as R  # noqa: E402

pytestmark = pytest.mark.triton
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs a GPU or the interpreter")


def _xz(n=21, dx=9, dz=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g)
    z = x[:, :dz] + 0.3 * torch.randn(n, dz, generator=g)
    return x.to(DEV), z.to(DEV)


@needs_kernels
def test_registry_routes_cpu_tensors_to_triton_only_by_name(monkeypatch):
    x, z = _xz()
    if DEV == "cpu":
        assert _backends.select("structure_loss", "auto", (x, z)) == "cpu"  # the interpreter is never "auto"
    assert _backends.select("structure_loss", "triton", (x, z)) == "triton"
    assert _backends.reasons("triton", "knn", ("cuda",), (torch.float64,)) in ([], [_backends.triton_error()])
    # CPU tensors go to Triton only under the interpreter. The variable is set by conftest only without CUDA,
    # so set it / remove it explicitly (raising=False: on a CUDA machine it is usually not set at all).
    refused = "needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = _backends.reasons("triton", "structure_loss", ("cpu",), (torch.float32,))
    assert not any(refused in w for w in why), why
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", value)
        why = _backends.reasons("triton", "structure_loss", ("cpu",), (torch.float32,))
        assert why and refused in why[0], (value, why)


@needs_kernels
@pytest.mark.parametrize("mode", ["rows", "flash"])
def test_structure_loss_matches_oracle(mode, monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_TRITON_PASS", mode)
    x, z = _xz()
    z.requires_grad_(True)
    loss = so.structure_loss(x, z, backend="triton")
    (gz,) = torch.autograd.grad(loss, z)
    zr = z.detach().double().requires_grad_(True)
    ref = R.structure_loss(x.double(), zr)
    (gr,) = torch.autograd.grad(ref, zr)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    torch.testing.assert_close(gz.double(), gr, rtol=1e-4, atol=1e-7)


@needs_kernels
def test_levels_and_options_through_the_api():
    x, z = _xz(n=13)
    kw = dict(levels=2, weighting="inverse", margin=0.01, similarity="rbf", gamma=0.7, divergence="js")
    got = so.structure_loss(x, z, backend="triton", **kw)
    want = R.structure_loss(x.double(), z.double(), **kw)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-9


@needs_kernels
def test_clip_and_knn_match_oracle():
    a, b = _xz(n=19, dx=7, dz=7)
    a.requires_grad_(True)
    s = torch.tensor(14.0, device=DEV, requires_grad=True)
    loss = so.clip_loss(a, b, s, backend="triton")
    ga, gs = torch.autograd.grad(loss, (a, s))
    ar, sr = a.detach().double().requires_grad_(True), s.detach().double().requires_grad_(True)
    ref = R.clip_loss(ar, b.double(), sr)
    gar, gsr = torch.autograd.grad(ref, (ar, sr))
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    torch.testing.assert_close(ga.double(), gar, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gs.double(), gsr, rtol=1e-4, atol=1e-7)
    assert torch.equal(so.knn(a.detach(), 4, backend="triton").cpu(), so.knn(a.detach().cpu(), 4, backend="reference"))


@needs_kernels
def test_opcheck_triton_ops():
    x, z = _xz(n=11, dx=5, dz=4)
    xh, zh = R.prepare(x), R.prepare(z).requires_grad_(True)
    args = (xh, zh, 1, 0.1, 0, 0.0, 0, 1.0, 0, 1e-12, "rows", False, True)
    torch.library.opcheck(torch.ops.structure_ops.triton_structure_fwd, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    a = torch.nn.functional.normalize(x, dim=1)
    torch.library.opcheck(torch.ops.structure_ops.triton_knn, (a, 3), test_utils=("test_schema", "test_faketensor"))
    s = torch.tensor(5.0, device=DEV)
    torch.library.opcheck(torch.ops.structure_ops.triton_clip_fwd, (a, a.flip(0).contiguous(), s),
                          test_utils=("test_schema", "test_faketensor"))


@needs_kernels
def test_torch_compile_fullgraph(dynamo_reset):
    x, z = _xz(n=12)
    z.requires_grad_(True)
    fn = torch.compile(lambda a, b: so.structure_loss(a, b, backend="triton"), fullgraph=True, backend="aot_eager")
    loss = fn(x, z)
    loss.backward()
    eager = so.structure_loss(x, z.detach(), backend="triton")
    assert torch.allclose(loss.detach(), eager, rtol=1e-6) and z.grad is not None


def test_bad_pass_name(monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_TRITON_PASS", "tiles")
    with pytest.raises(ValueError, match="STRUCTURE_OPS_TRITON_PASS must be one of"):
        _backends.triton_pass()


@needs_kernels
@pytest.mark.slow
def test_gpu_suite_smoke(tmp_path):
    """benchmarks/gpu_suite.py end to end at tiny sizes, so the GPU session's one command is known to work."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_suite.py"), "--smoke", "--out", str(tmp_path),
                           "--ops", "structure,clip", "--providers", "reference,chunked,triton_rows,triton_flash",
                           "--dtypes", "float32"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    data = json.loads((tmp_path / "gpu_structure.json").read_text())
    checks = {c["provider"]: c for c in data["checks"]}
    for p in ("chunked", "triton_rows", "triton_flash"):
        assert checks[p].get("rel_err", 1.0) < 1e-4, checks[p]
    assert any("median_s" in r and r["provider"] == "triton_rows" for r in data["records"])
