"""Backend registry: "auto" order, STRUCTURE_OPS_BACKEND override, explicit requests never fall back."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, G

import structure_ops
from structure_ops import _backends, reference

pytestmark = pytest.mark.usefixtures("cpu_ext")


def _xz():
    return G(6, 4, torch.sin, 1, 1), G(6, 3, torch.cos, 0.5, 0.3)


def test_backend_tables():
    assert set(structure_ops.BACKENDS) == {"reference", "cpu", "triton", "cuda"}
    assert set(structure_ops.AUTO_ORDER) == set(structure_ops.BACKENDS)
    assert structure_ops.AUTO_ORDER[-1] == "reference"  # the oracle is the last resort


@pytest.mark.parametrize("op", ["structure_loss", "clip_loss", "knn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_auto_picks_cpu_for_cpu_tensors(op, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as outside the test-suite: Triton needs CUDA tensors
    x = torch.ones(4, 3, dtype=dtype)
    assert _backends.select(op, "auto", (x, x)) == "cpu"
    available = _backends.availability(op, (x, x))
    assert available["cpu"] == [] and available["reference"] == []
    assert available["cuda"] and available["triton"]  # each with its reasons


def _spy_reference(monkeypatch):
    calls = []
    real = reference.structure_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "structure_loss", spy)
    return calls


def _spy_op(monkeypatch):
    calls = []
    real = torch.ops.structure_ops.structure_fwd

    def spy(*args):
        calls.append(args[2:])
        return real(*args)

    monkeypatch.setattr(torch.ops.structure_ops, "structure_fwd", spy)
    return calls


def test_auto_runs_the_cpu_kernel(monkeypatch):
    ref_calls, op_calls = _spy_reference(monkeypatch), _spy_op(monkeypatch)
    structure_ops.structure_loss(*_xz())
    assert len(op_calls) == 1 and ref_calls == []


def test_env_override_reference(monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_BACKEND", "reference")
    x, z = _xz()
    assert _backends.select("structure_loss", "auto", (x, z)) == "reference"
    ref_calls, op_calls = _spy_reference(monkeypatch), _spy_op(monkeypatch)
    value = structure_ops.structure_loss(x, z, levels=2)
    assert len(ref_calls) == 1 and ref_calls[0]["levels"] == 2 and op_calls == []
    # an explicit backend= still wins over the environment
    structure_ops.structure_loss(x, z, backend="cpu", levels=2)
    assert len(op_calls) == 1 and len(ref_calls) == 1
    assert value.item() == pytest.approx(reference.structure_loss(x, z, levels=2).item(), rel=1e-14)


def test_env_override_cpu_and_empty(monkeypatch):
    x, z = _xz()
    monkeypatch.setenv("STRUCTURE_OPS_BACKEND", "cpu")
    assert _backends.select("structure_loss", "auto", (x, z)) == "cpu"
    monkeypatch.setenv("STRUCTURE_OPS_BACKEND", "")  # empty means auto
    assert _backends.select("structure_loss", "auto", (x, z)) == "cpu"


@pytest.mark.parametrize("requested", ["cuda", "triton"])
def test_env_override_unavailable_backend_raises(monkeypatch, requested):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("STRUCTURE_OPS_BACKEND", requested)
    with pytest.raises(RuntimeError) as info:
        structure_ops.structure_loss(*_xz())
    message = str(info.value)
    assert f"backend={requested!r} (from STRUCTURE_OPS_BACKEND) cannot run them" in message
    for name in structure_ops.BACKENDS:
        assert f"  {name}: " in message
    with pytest.raises(RuntimeError, match="STRUCTURE_OPS_BACKEND"):
        structure_ops.clip_loss(*_xz()[:1], _xz()[0], 5.0)
    with pytest.raises(RuntimeError, match="STRUCTURE_OPS_BACKEND"):
        structure_ops.knn(_xz()[0], 2)


def test_env_override_unknown_name(monkeypatch):
    monkeypatch.setenv("STRUCTURE_OPS_BACKEND", "fast")
    with pytest.raises(RuntimeError, match=r"got 'fast' \(from STRUCTURE_OPS_BACKEND\)"):
        structure_ops.structure_loss(*_xz())


def test_env_is_read_on_every_eager_call(monkeypatch):
    """select() is wrapped in torch.compiler.assume_constant_result; in eager it must still be live."""
    x, z = _xz()
    seen = []
    for value in ("reference", "cpu", "reference"):
        monkeypatch.setenv("STRUCTURE_OPS_BACKEND", value)
        seen.append(_backends.select("structure_loss", "auto", (x, z)))
    assert seen == ["reference", "cpu", "reference"]


def test_reasons_name_the_problem():
    meta = torch.ones(3, 2, device="meta")
    r = _backends.reasons("cpu", "structure_loss", ("meta",), (torch.float32,))
    assert any("needs CPU tensors" in s and "meta" in s for s in r)
    r = _backends.reasons("cpu", "structure_loss", ("cpu",), (torch.complex64,))
    assert r and "supports" in r[0]
    assert _backends.reasons("reference", "structure_loss", ("meta",), (torch.float32,)) == []
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        _backends.reasons("mps", "structure_loss", ("cpu",), (torch.float32,))
    # a meta input selects the reference under auto (the oracle runs on any device)
    assert _backends.select("structure_loss", "auto", (meta, meta)) == "reference"
    with pytest.raises(RuntimeError, match=r"cpu: needs CPU tensors, got device\(s\) \['meta'\]"):
        _backends.select("structure_loss", "cpu", (meta, meta))


def test_reference_backend_runs_on_meta_tensors():
    """Shape propagation without data: the auto-selected reference works on the meta device."""
    x = torch.empty(5, 4, device="meta", dtype=F64)
    z = torch.empty(5, 3, device="meta", dtype=F64)
    out = structure_ops.structure_loss(x, z)
    assert out.device.type == "meta" and out.shape == ()
