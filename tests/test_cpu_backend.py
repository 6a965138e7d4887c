"""The C++ CPU backend against the float64 oracle: every option, dtype, awkward shape, non-contiguous
input and the multi-panel path; values and every gradient, with grad_output ≠ 1."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import F64, G, loss_and_grads, rel_err, structured

import structure_ops
from structure_ops import reference
from structure_ops._options import resolve_k

pytestmark = pytest.mark.usefixtures("cpu_ext")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
GRAD_SCALE = 1.7


def cpu_loss(**options):
    return lambda x, z: structure_ops.structure_loss(x, z, backend="cpu", **options)


def ref_loss(**options):
    return lambda x, z: reference.structure_loss(x, z, **options)


@functools.cache
def _data(n, dx, dz, seed=0):
    return structured(n, dx, dz, seed=seed)


def _key(options):
    return tuple(sorted(options.items()))


@functools.cache
def _oracle(n, dx, dz, seed, options_key):
    x, z = _data(n, dx, dz, seed)
    return loss_and_grads(ref_loss(**dict(options_key)), x, z, grad_x=True, scale=GRAD_SCALE)


def oracle(n, dx, dz, seed=0, **options):
    return _oracle(n, dx, dz, seed, _key(options))


def check_against_oracle(n, dx, dz, dtype, *, grad_x=True, seed=0, tol=None, **options):
    x, z = _data(n, dx, dz, seed)
    ref_l, ref_gx, ref_gz = oracle(n, dx, dz, seed, **options)
    loss, gx, gz = loss_and_grads(cpu_loss(**options), x.to(dtype), z.to(dtype), grad_x=grad_x, scale=GRAD_SCALE)
    tol = TOL[dtype] if tol is None else tol
    assert loss.dtype == dtype and loss.shape == ()
    assert gz.dtype == dtype and gz.shape == z.shape
    assert rel_err(loss, ref_l) <= tol, (loss.item(), ref_l.item())
    assert rel_err(gz, ref_gz) <= tol
    if grad_x:
        assert gx.dtype == dtype
        assert rel_err(gx, ref_gx) <= tol
    return ref_l


# ---------------------------------------------------------------------------------------------------
# Shapes × dtypes with the default options
# ---------------------------------------------------------------------------------------------------
# (N, d_x, d_z, τ): N around the panel/block edges, d ∈ {3, 64, 130}, d_x ≠ d_z included.
SHAPES = [
    (2, 3, 3, 0.05),
    (2, 130, 64, 0.2),
    (7, 3, 64, 0.05),
    (7, 130, 3, 0.1),
    (127, 64, 3, 0.05),
    (128, 130, 64, 0.05),
    (128, 3, 3, 0.2),
    (129, 3, 130, 0.05),
    (129, 64, 64, 0.5),
    (1025, 64, 3, 0.05),
]


SHAPE_CASES = [
    pytest.param(shape, dtype, grad_x, id=f"{shape}-{str(dtype)[6:]}-{'xz' if grad_x else 'z'}")
    for shape in SHAPES
    for dtype in (torch.float64, torch.float32)
    for grad_x in (False, True)
    if shape[0] < 1000 or grad_x == (dtype == torch.float32)  # N = 1025: two cases
]


@pytest.mark.parametrize(("shape", "dtype", "grad_x"), SHAPE_CASES)
def test_structure_shapes_dtypes(shape, dtype, grad_x):
    n, dx, dz, tau = shape
    ref = check_against_oracle(n, dx, dz, dtype, grad_x=grad_x, temperature=tau)
    assert ref.item() > 1e-3  # structured data: a loss far from the P ≈ I regime


def test_no_grad_and_detached_inputs():
    x, z = _data(64, 5, 7)
    with torch.no_grad():
        a = structure_ops.structure_loss(x, z.clone().requires_grad_(), backend="cpu", temperature=0.1)
    b = structure_ops.structure_loss(x, z, backend="cpu", temperature=0.1)
    ref = oracle(64, 5, 7, temperature=0.1)[0]
    assert not a.requires_grad and not b.requires_grad
    assert rel_err(a, ref) < 1e-12 and rel_err(b, ref) < 1e-12


@pytest.mark.parametrize("levels", [1, 2])
def test_gradient_only_for_x(levels):
    """x requires grad and z does not: the kernel's grad_z=False path."""
    x, z = _data(64, 5, 7)
    options = dict(temperature=0.1, levels=levels)
    ref_l, ref_gx, _ = oracle(64, 5, 7, **options)
    xx = x.clone().requires_grad_()
    loss = structure_ops.structure_loss(xx, z, backend="cpu", **options)
    (gx,) = torch.autograd.grad(GRAD_SCALE * loss, xx)
    assert rel_err(loss, ref_l) < 1e-10 and rel_err(gx, ref_gx) < 1e-10


# ---------------------------------------------------------------------------------------------------
# Every option of docs/spec.md §1
# ---------------------------------------------------------------------------------------------------
OPTIONS = [
    dict(temperature=0.1, levels=1, weighting="inverse"),
    dict(temperature=0.1, levels=2),
    dict(temperature=0.1, levels=3, weighting="inverse"),
    dict(temperature=0.2, levels=5, weighting="inverse"),
    dict(temperature=0.2, levels=4, weighting="none"),
    dict(temperature=0.1, margin=0.1),
    dict(temperature=0.1, levels=3, weighting="inverse", margin=0.05),
    dict(temperature=0.1, centering="standard"),
    dict(temperature=0.1, centering="none"),
    dict(temperature=0.1, center_first=True),
    dict(temperature=0.1, center_first=True, centering="standard", levels=2),
    dict(similarity="rbf"),
    dict(similarity="rbf", gamma=2.5),
    dict(similarity="rbf", gamma=0.5, levels=3, weighting="inverse"),
    dict(temperature=0.05, divergence="js"),
    dict(temperature=0.1, divergence="js", levels=3, weighting="inverse"),
    dict(similarity="rbf", gamma=3.0, divergence="js"),
    dict(similarity="rbf", gamma=3.0, divergence="js", levels=2),
    dict(temperature=0.1, eps=1e-6),
]


def _ids(o):
    return ",".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_structure_options(options, dtype):
    ref = check_against_oracle(64, 5, 7, dtype, grad_x=True, seed=1, **options)
    assert ref.item() > 1e-4


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_structure_options_many_panels(options, tiny_panels):
    """STRUCTURE_OPS_CPU_PANEL_MB=0.01: row panels of 1–16 rows with a ragged last panel."""
    check_against_oracle(129, 3, 130, torch.float64, grad_x=True, seed=2, **options)


@pytest.mark.parametrize(
    ("n", "dx", "dz", "dtype"),
    [(200, 64, 64, torch.float64), (1025, 3, 64, torch.float32)],
    ids=["200-f64", "1025-f32"],
)
def test_structure_many_panels_large(n, dx, dz, dtype, tiny_panels):
    check_against_oracle(n, dx, dz, dtype, grad_x=True, temperature=0.05)


def test_panel_budget_does_not_change_the_result(monkeypatch):
    x, z = _data(129, 64, 64)
    fn = cpu_loss(temperature=0.05)
    default = loss_and_grads(fn, x, z)
    monkeypatch.setenv("STRUCTURE_OPS_CPU_PANEL_MB", "0.01")
    tiny = loss_and_grads(fn, x, z)
    monkeypatch.setenv("STRUCTURE_OPS_CPU_PANEL_MB", "0.3")
    mid = loss_and_grads(fn, x, z)
    for a, b, c in zip(default, tiny, mid, strict=True):
        assert rel_err(b, a) < 1e-13 and rel_err(c, a) < 1e-13


# ---------------------------------------------------------------------------------------------------
# Margin
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_margin_above_divergence_gives_zero_loss_and_grads(backend, levels, dtype):
    x, z = _data(64, 5, 7)
    fn = lambda x, z: structure_ops.structure_loss(  # noqa: E731
        x, z, backend=backend, levels=levels, temperature=0.1, margin=50.0
    )
    assert oracle(64, 5, 7, temperature=0.1, levels=levels)[0].item() < 50.0
    loss, gx, gz = loss_and_grads(fn, x.to(dtype), z.to(dtype))
    assert loss.item() == 0.0
    assert gx.abs().max().item() == 0.0 and gz.abs().max().item() == 0.0


def _level_divergences(x, z, levels, tau):
    px = reference.similarity(reference.prepare(x), temperature=tau).softmax(dim=1)
    pz = reference.similarity(reference.prepare(z), temperature=tau).softmax(dim=1)
    return [
        reference.structure_divergence(torch.linalg.matrix_power(px, l), torch.linalg.matrix_power(pz, l)).item()
        for l in range(1, levels + 1)
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_margin_between_levels(dtype):
    """Margin above some levels' D_l and below others': only the open hinges contribute."""
    x, z = _data(64, 5, 7)
    d = _level_divergences(x, z, 4, 0.1)
    margin = 0.5 * (max(d) + min(d))
    assert 0 < sum(v > margin for v in d) < 4
    ref = check_against_oracle(64, 5, 7, dtype, levels=4, weighting="inverse", temperature=0.1, margin=margin)
    expected = sum(max(v - margin, 0.0) / l for l, v in enumerate(d, start=1)) / 4
    assert ref.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Non-contiguous inputs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("options", [dict(temperature=0.05), dict(levels=2, temperature=0.1), dict(centering="none")])
def test_structure_non_contiguous(dtype, options):
    n, dx, dz = 129, 64, 3
    x, z = _data(n, dx, dz)
    options = {"temperature": 0.1, **options}
    ref_l, ref_gx, ref_gz = oracle(n, dx, dz, **options)
    # x: every other column of a wider buffer; z: a transposed view of a (d_z, N) buffer.
    x_buf = torch.zeros(n, 2 * dx, dtype=dtype)
    x_buf[:, ::2] = x.to(dtype)
    x_buf.requires_grad_()
    zt = z.to(dtype).T.contiguous().requires_grad_()
    xv, zv = x_buf[:, ::2], zt.T
    assert not xv.is_contiguous() and not zv.is_contiguous()
    loss = structure_ops.structure_loss(xv, zv, backend="cpu", **options)
    gbuf, gzt = torch.autograd.grad(GRAD_SCALE * loss, (x_buf, zt))
    tol = TOL[dtype]
    assert rel_err(loss, ref_l) <= tol
    assert rel_err(gbuf[:, ::2], ref_gx) <= tol
    assert gbuf[:, 1::2].abs().max().item() == 0.0
    assert rel_err(gzt.T, ref_gz) <= tol


def test_structure_row_strided_and_offset_views():
    n, dx, dz = 127, 64, 3
    x, z = _data(n, dx, dz)
    ref_l, _, ref_gz = oracle(n, dx, dz, temperature=0.05)
    x_rows = torch.zeros(2 * n, dx, dtype=F64)
    x_rows[::2] = x
    z_buf = torch.zeros(n + 5, dz + 2, dtype=F64)
    z_buf[5:, 1 : 1 + dz] = z
    z_buf.requires_grad_()
    zv = z_buf[5:, 1 : 1 + dz]  # storage offset and row stride ≠ d_z
    loss = structure_ops.structure_loss(x_rows[::2], zv, backend="cpu", temperature=0.05)
    (g,) = torch.autograd.grad(GRAD_SCALE * loss, z_buf)
    assert rel_err(loss, ref_l) < 1e-10
    assert rel_err(g[5:, 1 : 1 + dz], ref_gz) < 1e-10
    assert g[:5].abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------------
# Half types: accepted, computed in fp32
# ---------------------------------------------------------------------------------------------------
HALF_TOL = {torch.bfloat16: (2e-2, 1e-1), torch.float16: (5e-3, 3e-2)}  # (loss, gradients)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.1),
        dict(temperature=0.1, levels=2),
        dict(temperature=0.1, divergence="js"),
        dict(similarity="rbf"),
    ],
    ids=_ids,
)
@pytest.mark.parametrize("n", [7, 129])
def test_structure_half_precision(dtype, options, n):
    x, z = _data(n, 5, 7)
    xq, zq = x.to(dtype), z.to(dtype)
    # The oracle on the rounded inputs: what fp32 math on these bf16/fp16 values should approach.
    ref_l, ref_gx, ref_gz = loss_and_grads(ref_loss(**options), xq.double(), zq.double())
    loss, gx, gz = loss_and_grads(cpu_loss(**options), xq, zq)
    assert loss.dtype == dtype and gx.dtype == dtype and gz.dtype == dtype
    tol_l, tol_g = HALF_TOL[dtype]
    assert rel_err(loss, ref_l) <= tol_l
    assert rel_err(gx, ref_gx) <= tol_g
    assert rel_err(gz, ref_gz) <= tol_g


# ---------------------------------------------------------------------------------------------------
# CLIP loss
# ---------------------------------------------------------------------------------------------------
@functools.cache
def _clip_data(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 4, generator=g, dtype=F64)
    a = lat @ torch.randn(4, k, generator=g, dtype=F64) + 0.3 * torch.randn(n, k, generator=g, dtype=F64)
    b = lat @ torch.randn(4, k, generator=g, dtype=F64) + 0.3 * torch.randn(n, k, generator=g, dtype=F64)
    # rows of norm 0.5–1.5, so normalize=False gives logits of the same order as normalize=True
    a = F.normalize(a, dim=1) * torch.linspace(0.5, 1.5, n, dtype=F64)[:, None]
    b = F.normalize(b, dim=1) * torch.linspace(1.5, 0.5, n, dtype=F64)[:, None]
    return a, b


def clip_value_and_grads(fn, a, b, s):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    loss = fn(a, b, s)
    return (loss.detach(), *torch.autograd.grad(GRAD_SCALE * loss, (a, b, s)))


CLIP_CASES = [
    pytest.param(n, k, dtype, normalize, scale_shape, id=f"{n}x{k}-{str(dtype)[6:]}-norm{normalize}-s{scale_shape}")
    for (n, k) in [(2, 3), (7, 64), (128, 3), (129, 130), (1025, 64)]
    for dtype in (torch.float64, torch.float32)
    for normalize in (True, False)
    for scale_shape in ((), (1,))
    if n < 1000 or (normalize and scale_shape == ())  # N = 1025 once per dtype
]


@pytest.mark.parametrize(("n", "k", "dtype", "normalize", "scale_shape"), CLIP_CASES)
def test_clip_matches_oracle(n, k, dtype, normalize, scale_shape):
    a, b = _clip_data(n, k)
    s = torch.full(scale_shape, 20.0, dtype=F64)
    ref = clip_value_and_grads(lambda a, b, s: reference.clip_loss(a, b, s.reshape(()), normalize=normalize), a, b, s)
    out = clip_value_and_grads(
        lambda a, b, s: structure_ops.clip_loss(a, b, s, normalize=normalize, backend="cpu"),
        a.to(dtype),
        b.to(dtype),
        s.to(dtype),
    )
    assert out[0].shape == () and out[0].dtype == dtype
    assert out[3].shape == scale_shape and out[3].dtype == dtype
    assert ref[0].item() > 0.1
    for got, want in zip(out, ref, strict=True):
        assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_clip_spec_anchor_cpu(temperature):
    a, b = G(4, 3, torch.sin, 1, 0), G(4, 3, torch.cos, 1, 0)
    expected = {0.05: 4.601090522, 1.0: 1.356212372}[temperature]
    value = structure_ops.clip_loss(a, b, torch.tensor(1.0 / temperature, dtype=F64), backend="cpu")
    assert value.item() == pytest.approx(expected, rel=0, abs=5e-10)


def test_clip_scale_dtype_and_python_number():
    a, b = _clip_data(33, 8)
    ref = reference.clip_loss(a, b, 14.0)
    assert structure_ops.clip_loss(a, b, 14.0, backend="cpu").item() == pytest.approx(ref.item(), rel=1e-12)
    # a float32 parameter driving a float64 loss still receives its gradient, in its own dtype
    s32 = torch.tensor(14.0, dtype=torch.float32, requires_grad=True)
    s64 = torch.tensor(14.0, dtype=F64, requires_grad=True)
    (g32,) = torch.autograd.grad(structure_ops.clip_loss(a, b, s32, backend="cpu"), s32)
    (g64,) = torch.autograd.grad(reference.clip_loss(a, b, s64), s64)
    assert g32.dtype == torch.float32
    assert g32.item() == pytest.approx(g64.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_clip_non_contiguous_and_many_panels(dtype, tiny_panels):
    n, k = 129, 64
    a, b = _clip_data(n, k)
    s = torch.tensor(20.0, dtype=F64)
    ref = clip_value_and_grads(lambda a, b, s: reference.clip_loss(a, b, s, normalize=False), a, b, s)
    at = a.to(dtype).T.contiguous().requires_grad_()
    b_buf = torch.zeros(n, 2 * k, dtype=dtype)
    b_buf[:, 1::2] = b.to(dtype)
    b_buf.requires_grad_()
    st = s.to(dtype).requires_grad_()
    av, bv = at.T, b_buf[:, 1::2]
    assert not av.is_contiguous() and not bv.is_contiguous()
    loss = structure_ops.clip_loss(av, bv, st, normalize=False, backend="cpu")
    ga, gb, gs = torch.autograd.grad(GRAD_SCALE * loss, (at, b_buf, st))
    tol = TOL[dtype]
    assert rel_err(loss, ref[0]) <= tol
    assert rel_err(ga.T, ref[1]) <= tol
    assert rel_err(gb[:, 1::2], ref[2]) <= tol
    assert gb[:, ::2].abs().max().item() == 0.0
    assert rel_err(gs, ref[3]) <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_clip_half_precision(dtype):
    a, b = _clip_data(64, 16)
    aq, bq = a.to(dtype), b.to(dtype)
    s = torch.tensor(20.0, dtype=F64)
    ref = clip_value_and_grads(lambda a, b, s: reference.clip_loss(a, b, s), aq.double(), bq.double(), s)
    out = clip_value_and_grads(lambda a, b, s: structure_ops.clip_loss(a, b, s, backend="cpu"), aq, bq, s.to(dtype))
    assert all(t.dtype == dtype for t in out)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in zip(out, ref, strict=True):
        assert rel_err(got, want) <= tol


# ---------------------------------------------------------------------------------------------------
# kNN and mutual kNN
# ---------------------------------------------------------------------------------------------------
KNN_CASES = [
    pytest.param(n, d, k, id=f"{n}x{d}-k{k}")
    for (n, d) in [(2, 3), (7, 64), (128, 3), (129, 130), (1025, 64)]
    for k in (1, 5, "rice", "sqrt", "sturges")
    if n < 1000 or k in (5, "rice")
]


@pytest.mark.parametrize(("n", "d", "k"), KNN_CASES)
def test_knn_matches_reference(n, d, k):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, d, generator=g, dtype=F64)
    if isinstance(k, int):
        k = min(k, n - 1)
    expected = reference.knn(F.normalize(a, dim=1), k)
    got = structure_ops.knn(a, k, backend="cpu")
    assert got.dtype == torch.long
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_ties_go_to_lower_index(dtype, tiny_panels):
    """Integer rows with many duplicates: every similarity is exact, so ties are real ties."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (12, 4), generator=g).to(F64)
    a = base[torch.randint(0, 12, (150,), generator=g)]  # 150 rows, each repeated ~12 times
    expected = reference.knn(a, 20)
    got = structure_ops.knn(a.to(dtype), 20, normalize=False, backend="cpu")
    assert torch.equal(got, expected)
    # the rule itself, independently of the oracle: along each list, similarities never increase, and
    # within a run of equal similarities the indices increase
    sims = (a @ a.T).gather(1, got)
    assert (sims[:, 1:] <= sims[:, :-1]).all()
    equal = sims[:, 1:] == sims[:, :-1]
    assert (got[:, 1:] > got[:, :-1])[equal].all()
    assert equal.any()


def test_knn_duplicate_rows_after_normalization():
    a = torch.tensor([[3.0, 4.0], [0.6, 0.8], [6.0, 8.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    got = structure_ops.knn(a, 3, backend="cpu")
    assert torch.equal(got, reference.knn(F.normalize(a, dim=1), 3))
    assert got[0].tolist()[:2] == [1, 2] and got[1].tolist()[:2] == [0, 2] and got[2].tolist()[:2] == [0, 1]


@pytest.mark.parametrize("k", ["rice", "sqrt", "sturges", 1, 4, 15])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mutual_knn_matches_reference(k, dtype):
    a, b = structured(150, 12, 9, seed=4)
    expected = reference.mutual_knn(a, b, k)
    assert 0.0 < expected.item() < 1.0
    got = structure_ops.mutual_knn(a.to(dtype), b.to(dtype), k, backend="cpu")
    assert got.dtype == dtype and got.shape == ()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6 if dtype == torch.float32 else 1e-14)
    # and the neighbour lists themselves are the oracle's
    kk = resolve_k(k, 150)
    for u in (a, b):
        assert torch.equal(structure_ops.knn(u.to(dtype), kk, backend="cpu"), reference.knn(F.normalize(u, dim=1), kk))


def test_mutual_knn_spec_anchor_cpu():
    x, y = G(8, 4, torch.sin, 1, 1), G(8, 3, torch.cos, 0.5, 0.3)
    assert structure_ops.mutual_knn(x, y, 2, backend="cpu").item() == 0.1875
    assert structure_ops.mutual_knn(x, x, "sqrt", backend="cpu").item() == 1.0
