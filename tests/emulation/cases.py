"""Inputs and float64 oracles shared by the CUDA tests (tests/test_cuda_*.py) and their emulated twins here.

Expected values come from ``structure_ops.reference`` in float64 on the inputs rounded to the kernel's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from structure_ops import reference

F64 = torch.float64
GRAD = 1.75  # grad_output ≠ 1 (exact in every dtype): the backward must scale by it


# ------------------------------------------------------------------------------------------------------------
# structure_fwd / structure_rows_fwd (option dicts from helpers.opts)
# ------------------------------------------------------------------------------------------------------------
def prepared(n, dx, dz, dtype=torch.float32, seed=0, device="cpu"):
    """Normalized-and-centered X̂, Ẑ (prepared in float64, then rounded to ``dtype``)."""
    from helpers import structured

    x, z = structured(n, dx, dz, seed=seed)
    xh, zh = reference.prepare(x), reference.prepare(z)
    return xh.to(device=device, dtype=dtype), zh.to(device=device, dtype=dtype)


def call(op, xh, zh, o, grad_x=True, grad_z=True):
    return op(
        xh, zh, o["levels"], o["temperature"], o["weighting"], o["margin"], o["similarity"], o["gamma"],
        o["divergence"], o["eps"], grad_x, grad_z,
    )  # fmt: skip


def rows_call(op, xh, zh, begin, end, o, grad_x=True, grad_z=True):
    return op(
        xh, zh, begin, end, o["temperature"], o["similarity"], o["gamma"], o["divergence"], o["eps"], grad_x, grad_z
    )


def panel_bytes_per_row(n, grad_x, grad_z, dtype):
    """Bytes per row of the level-1 panel buffers of structure_cuda.cu: two Gram rows in the compute dtype (fp64 for
    fp64 inputs, else fp32) and one W row per side with a gradient in the GEMM operand dtype (the input dtype)."""
    ec = 8 if dtype == torch.float64 else 4
    ew = torch.empty((), dtype=dtype).element_size() if dtype in (torch.float16, torch.bfloat16) else ec
    return n * (2 * ec + (int(grad_x) + int(grad_z)) * ew)


def force_panel_rows(monkeypatch, rows, n, grad_x, grad_z, dtype):
    """STRUCTURE_OPS_CUDA_PANEL_MB such that the level-1 panels of structure_cuda.cu hold exactly ``rows`` rows
    (``rows`` < 64, or a multiple of 16: larger heights are rounded down to one)."""
    bytes_per_row = panel_bytes_per_row(n, grad_x, grad_z, dtype)
    monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", repr((rows + 0.5) * bytes_per_row / 2**20))


def expected_panel_rows(n, bytes_per_row, *, free_bytes, knob_mb=None, span=None):
    """The panel height rule of structure_cuda.cu (panel_rows_from_memory), restated: the buffers take at most half
    of the available device memory and at most the cap (the knob, else 2048 MiB); without the knob at least 256
    rows when memory allows; heights ≥ 64 are multiples of 16; between 1 and the number of rows in the range."""
    mem = 0.5 * free_bytes
    cap = (knob_mb if knob_mb else 2048.0) * 2**20
    rows = int(min(cap, mem) // bytes_per_row)
    if not knob_mb:
        rows = max(rows, min(256, int(mem // bytes_per_row)))
    if rows >= 64:
        rows -= rows % 16
    return max(1, min(rows, span if span is not None else n))


def emulate_panel_memory(monkeypatch, bytes_per_row, free_rows=None, knob_rows=None):
    """Sets what the emulated GPU reports as free memory (just over 2·``free_rows`` panel rows, so half of it holds
    ``free_rows``) and STRUCTURE_OPS_CUDA_PANEL_MB (``knob_rows`` + ½ rows); None leaves either unset (free: 64 GiB).
    Returns (free_bytes, knob_mb) for :func:`expected_panel_rows`."""
    free = 2**36
    if free_rows is not None:
        free = 2 * free_rows * bytes_per_row + bytes_per_row // 2
        monkeypatch.setenv("SO_EMU_FREE_BYTES", str(free))
    knob = None
    if knob_rows is not None:
        knob = (knob_rows + 0.5) * bytes_per_row / 2**20
        monkeypatch.setenv("STRUCTURE_OPS_CUDA_PANEL_MB", repr(knob))
    return free, knob


class AtenLog:
    """Context manager recording every aten call made inside (including the at:: calls of the C++ host code) as
    dicts: op (overload packet name), overload, args and kwargs with tensors as (dtype, shape)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        log = self.calls

        def desc(v):
            return (v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else v

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                log.append(dict(op=func.overloadpacket.__name__, overload=func._overloadname,
                                args=[desc(a) for a in args], kwargs={k: desc(v) for k, v in kwargs.items()}))  # fmt: skip
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def find(self, op, overload=None):
        return [c for c in self.calls if c["op"] == op and (overload is None or c["overload"] == overload)]


# ------------------------------------------------------------------------------------------------------------
# clip_fwd / clip_bwd
# ------------------------------------------------------------------------------------------------------------
@functools.cache
def clip_data(n: int, d: int, seed: int = 0):
    """Normalized, correlated pairs (row i of B is a noisy copy of row i of A), float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    b = F.normalize(a + 0.7 * torch.randn(n, d, generator=g, dtype=F64), dim=1)
    return a, b


def clip_oracle(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, normalize: bool = False):
    """Loss, row/column lse of the logits, and the gradients of GRAD·loss w.r.t. (a, b, s), float64."""
    a = a.detach().to(F64).clone().requires_grad_()
    b = b.detach().to(F64).clone().requires_grad_()
    st = s.detach().to(F64).reshape(()).clone().requires_grad_()
    with torch.enable_grad():
        loss = reference.clip_loss(a, b, st, normalize=normalize)
        ga, gb, gs = torch.autograd.grad(GRAD * loss, (a, b, st))
    with torch.no_grad():
        an, bn = (F.normalize(a, dim=1), F.normalize(b, dim=1)) if normalize else (a, b)
        logits = st * an @ bn.T
    return loss.detach(), logits.logsumexp(1), logits.logsumexp(0), ga, gb, gs


# ------------------------------------------------------------------------------------------------------------
# knn
# ------------------------------------------------------------------------------------------------------------
def tied(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Small-integer rows (every product and sum exact in fp32/bf16, so similarities tie exactly) with
    duplicated rows: the tie rule decides much of the order."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (n, d), generator=g).to(F64)
    a[n // 2] = a[1]
    a[n - 1] = a[1]
    return a


def knn_oracle(a: torch.Tensor, k: int) -> torch.Tensor:
    """The float64 oracle on the values the kernel sees (``a`` rounded to its dtype)."""
    return reference.knn(a.detach().cpu().to(F64), k)


def pick_margin(xh, zh, o, how):
    """``how`` None: o unchanged; "low": a margin below every level's value (all active); "mid": between the two
    smallest level values (some levels clipped, some active)."""
    from helpers import level_values, opts

    if how is None:
        return o
    d = level_values(xh, zh, o)
    if how == "low":
        return opts(**{**o, "margin": 0.5 * min(d)})
    lo, hi = sorted(d)[:2]
    margin = 0.5 * (lo + hi)
    assert any(v > margin for v in d) and any(v < margin for v in d)
    return opts(**{**o, "margin": margin})


def check_structure(out, ref, tol, xh, zh, grad_x=True, grad_z=True):
    """structure_fwd's return conventions and ‖out − ref‖/‖ref‖ ≤ tol for the loss and requested gradients
    (``tol``: one number, or one per output (loss, ∂/∂X̂, ∂/∂Ẑ))."""
    from helpers import rel_err

    tols = dict(zip(("loss", "gx", "gz"), tol, strict=True)) if isinstance(tol, list | tuple) else dict.fromkeys(
        ("loss", "gx", "gz"), tol)  # fmt: skip
    loss, gx, gz = out
    rl, rgx, rgz = ref
    assert loss.shape == () and loss.dtype == xh.dtype and loss.device == xh.device
    errs = {"loss": rel_err(loss, rl)}
    for name, want, g, u, rg in (("gx", grad_x, gx, xh, rgx), ("gz", grad_z, gz, zh, rgz)):
        assert g.dtype == u.dtype and g.device == u.device
        if want:
            assert g.shape == u.shape and g.is_contiguous()
            errs[name] = rel_err(g, rg)
        else:
            assert g.shape == (0,)
    assert all(e <= tols[k] for k, e in errs.items()), (errs, tols)
    return errs


def _structure_cases():
    from helpers import opts

    l1 = [
        dict(n=37, dx=17, dz=5, grad_x=True, o=opts()),
        dict(n=13, dx=3, dz=5, grad_x=False, o=opts(divergence=1, temperature=0.1)),
        dict(n=7, dx=5, dz=3, grad_x=True, o=opts(similarity=1, gamma=2.0, eps=1e-3)),
        dict(n=37, dx=5, dz=17, grad_x=True, o=opts(similarity=1, divergence=1, gamma=0.5)),
        dict(n=13, dx=17, dz=3, grad_x=True, o=opts(eps=1e-3, temperature=0.2)),
    ]
    ml = [
        dict(n=13, dx=5, dz=3, grad_x=True, margin="mid", o=opts(levels=2)),
        dict(n=37, dx=3, dz=17, grad_x=False, margin="mid", o=opts(levels=3, weighting=1, divergence=1, temperature=0.1)),
        dict(n=7, dx=17, dz=5, grad_x=True, margin=None, o=opts(levels=3, weighting=1, similarity=1, eps=1e-3)),
        dict(n=13, dx=5, dz=5, grad_x=True, margin="low", o=opts(levels=2, weighting=1, similarity=1, divergence=1)),
        dict(n=37, dx=17, dz=5, grad_x=True, margin=None, o=opts(levels=3, temperature=0.1)),
    ]
    return l1, ml


L1_CASES, ML_CASES = _structure_cases()
STRUCTURE_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def l1_id(c):
    return f"n{c['n']}-s{c['o']['similarity']}-d{c['o']['divergence']}-gx{int(c['grad_x'])}"


def ml_id(c):
    return f"L{c['o']['levels']}-n{c['n']}-s{c['o']['similarity']}-d{c['o']['divergence']}-m{c['margin']}"
