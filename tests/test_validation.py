"""Bad inputs give clear errors naming the argument; finite inputs never give NaN/Inf; non-finite inputs
propagate."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import F64, G, structured

import structure_ops
from structure_ops import reference

pytestmark = pytest.mark.usefixtures("cpu_ext")

BACKENDS = ["reference", "cpu"]


def _xz(n=6, dx=4, dz=3, dtype=F64):
    return G(n, dx, torch.sin, 1, 1, dtype), G(n, dz, torch.cos, 0.5, 0.3, dtype)


# ---------------------------------------------------------------------------------------------------
# structure_loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
class TestStructureErrors:
    def test_mismatched_rows(self, backend):
        x, z = G(5, 4, torch.sin), G(6, 3, torch.cos)
        with pytest.raises(ValueError, match=r"x and z must have the same number of rows N") as info:
            structure_ops.structure_loss(x, z, backend=backend)
        assert "(5, 4)" in str(info.value) and "(6, 3)" in str(info.value)

    @pytest.mark.parametrize(("which", "shape"), [("x", (6,)), ("z", (2, 6, 3)), ("x", ())])
    def test_wrong_ndim(self, backend, which, shape):
        x, z = _xz()
        bad = torch.zeros(shape, dtype=F64)
        args = (bad, z) if which == "x" else (x, bad)
        with pytest.raises(
            ValueError, match=rf"^{which} must be a 2-D \(N, d\) tensor, got shape {re.escape(str(shape))}"
        ):
            structure_ops.structure_loss(*args, backend=backend)

    @pytest.mark.parametrize("shape", [(1, 3), (0, 3)])
    def test_too_few_rows(self, backend, shape):
        x = torch.ones(shape, dtype=F64)
        with pytest.raises(ValueError, match=r"x needs N >= 2 rows"):
            structure_ops.structure_loss(x, x.clone(), backend=backend)

    def test_empty_features(self, backend):
        x = torch.ones(4, 0, dtype=F64)
        with pytest.raises(ValueError, match=r"x needs N >= 2 rows and d >= 1 columns, got shape \(4, 0\)"):
            structure_ops.structure_loss(x, torch.ones(4, 2, dtype=F64), backend=backend)

    def test_mixed_dtypes(self, backend):
        # Mixed dtypes compute in the wider dtype (docs/ops.md): the same value as both inputs in float64.
        x, z = _xz()
        out = structure_ops.structure_loss(x, z.float(), backend=backend)
        assert out.dtype == torch.float64
        ref = structure_ops.reference.structure_loss(x, z.float().double())
        assert abs(out.item() - ref.item()) <= 1e-12 * abs(ref.item())

    def test_mixed_devices(self, backend):
        x, z = _xz()
        with pytest.raises(ValueError, match=r"x and z must be on the same device") as info:
            structure_ops.structure_loss(x, z.to("meta"), backend=backend)
        assert "meta" in str(info.value) and "cpu" in str(info.value)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
    def test_integer_dtype(self, backend, dtype):
        x = torch.ones(4, 3, dtype=dtype)
        with pytest.raises(TypeError, match=r"x must have a floating-point dtype"):
            structure_ops.structure_loss(x, x.clone(), backend=backend)

    def test_not_a_tensor(self, backend):
        with pytest.raises(TypeError, match=r"z must be a torch.Tensor, got list"):
            structure_ops.structure_loss(_xz()[0], [[1.0, 2.0]], backend=backend)

    @pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf")])
    def test_bad_temperature(self, backend, value):
        with pytest.raises(ValueError, match=r"^temperature must be"):
            structure_ops.structure_loss(*_xz(), temperature=value, backend=backend)

    def test_temperature_type(self, backend):
        with pytest.raises(TypeError, match=r"temperature must be a real number"):
            structure_ops.structure_loss(*_xz(), temperature="0.1", backend=backend)

    @pytest.mark.parametrize("levels", [0, -1, 1.5, True, "2"])
    def test_bad_levels(self, backend, levels):
        with pytest.raises(ValueError, match=r"levels must be an int >= 1"):
            structure_ops.structure_loss(*_xz(), levels=levels, backend=backend)

    @pytest.mark.parametrize(
        ("name", "value", "message"),
        [
            ("margin", -0.1, r"margin must be >= 0"),
            ("gamma", 0.0, r"gamma must be > 0"),
            ("eps", 0.0, r"eps must be > 0"),
            ("eps", -1e-12, r"eps must be > 0"),
        ],
    )
    def test_bad_numbers(self, backend, name, value, message):
        with pytest.raises(ValueError, match=message):
            structure_ops.structure_loss(*_xz(), backend=backend, **{name: value})

    @pytest.mark.parametrize("name", ["weighting", "centering", "similarity", "divergence"])
    def test_unknown_option_string(self, backend, name):
        with pytest.raises(ValueError, match=rf"^{name} must be one of \[.*\], got 'bogus'"):
            structure_ops.structure_loss(*_xz(), backend=backend, **{name: "bogus"})

    def test_center_first_type(self, backend):
        with pytest.raises(TypeError, match=r"center_first must be a bool"):
            structure_ops.structure_loss(*_xz(), center_first="yes", backend=backend)


def test_unknown_backend_string():
    with pytest.raises(
        RuntimeError, match=r"backend must be 'auto' or one of \['reference', 'cpu', 'triton', 'cuda'\], got 'gpu'"
    ):
        structure_ops.structure_loss(*_xz(), backend="gpu")


def test_backend_type():
    with pytest.raises(TypeError, match=r"backend must be a string"):
        structure_ops.structure_loss(*_xz(), backend=None)


def _assert_lists_every_backend(message: str, requested: str):
    assert f"backend={requested!r}" in message
    lines = message.splitlines()
    for name in structure_ops.BACKENDS:
        line = next((ln for ln in lines if ln.strip().startswith(f"{name}:")), None)
        assert line is not None, f"{name} missing from:\n{message}"
        assert line.split(":", 1)[1].strip(), f"{name} has no reason in:\n{message}"
    assert re.search(r"^\s*cpu: available$", message, flags=re.M)
    assert re.search(r"^\s*reference: available$", message, flags=re.M)
    assert re.search(r"^\s*cuda: .*needs CUDA tensors", message, flags=re.M)
    assert re.search(r"^\s*triton: .*needs CUDA tensors", message, flags=re.M)


@pytest.mark.parametrize("requested", ["cuda", "triton"])
def test_explicit_gpu_backend_on_cpu_lists_every_backend(requested, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a CPU machine outside the test-suite
    x, z = _xz()
    a = torch.randn(6, 3, dtype=F64)
    calls = [
        lambda: structure_ops.structure_loss(x, z, backend=requested),
        lambda: structure_ops.clip_loss(a, a + 1, 10.0, backend=requested),
        lambda: structure_ops.knn(a, 2, backend=requested),
        lambda: structure_ops.mutual_knn(a, a, 2, backend=requested),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        message = str(info.value)
        assert "(6, 3) torch.float64 on cpu" in message  # the inputs are described
        _assert_lists_every_backend(message, requested)


# ---------------------------------------------------------------------------------------------------
# clip_loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
class TestClipErrors:
    def test_mismatched_rows(self, backend):
        with pytest.raises(ValueError, match=r"image and text must have the same number of rows N"):
            structure_ops.clip_loss(torch.ones(4, 3, dtype=F64), torch.ones(5, 3, dtype=F64), 1.0, backend=backend)

    def test_mismatched_width(self, backend):
        with pytest.raises(ValueError, match=r"image and text must have the same width") as info:
            structure_ops.clip_loss(torch.ones(4, 3, dtype=F64), torch.ones(4, 5, dtype=F64), 1.0, backend=backend)
        assert "(4, 3)" in str(info.value) and "(4, 5)" in str(info.value)

    def test_logit_scale_with_several_elements(self, backend):
        a = torch.randn(4, 3, dtype=F64)
        with pytest.raises(ValueError, match=r"logit_scale must be a scalar \(one element\), got shape \(2,\)"):
            structure_ops.clip_loss(a, a, torch.tensor([1.0, 2.0], dtype=F64), backend=backend)

    def test_logit_scale_integer(self, backend):
        a = torch.randn(4, 3, dtype=F64)
        with pytest.raises(TypeError, match=r"logit_scale must have a floating-point dtype"):
            structure_ops.clip_loss(a, a, torch.tensor(3), backend=backend)

    @pytest.mark.parametrize("value", ["10", None, True])
    def test_logit_scale_type(self, backend, value):
        a = torch.randn(4, 3, dtype=F64)
        with pytest.raises(TypeError, match=r"logit_scale must be a one-element tensor or a number"):
            structure_ops.clip_loss(a, a, value, backend=backend)

    def test_wrong_ndim_and_dtype(self, backend):
        a = torch.randn(4, 3, dtype=F64)
        with pytest.raises(ValueError, match=r"text must be a 2-D"):
            structure_ops.clip_loss(a, a[0], 1.0, backend=backend)
        with pytest.raises(TypeError, match=r"image must have a floating-point dtype"):
            structure_ops.clip_loss(a.long(), a.long(), 1.0, backend=backend)
        assert structure_ops.clip_loss(a, a.float(), 1.0, backend=backend).dtype == F64  # the wider dtype
        with pytest.raises(ValueError, match=r"image and text must be on the same device"):
            structure_ops.clip_loss(a, a.to("meta"), 1.0, backend=backend)
        with pytest.raises(ValueError, match=r"image needs N >= 2 rows"):
            structure_ops.clip_loss(a[:1], a[:1], 1.0, backend=backend)

    def test_normalize_type(self, backend):
        a = torch.randn(4, 3, dtype=F64)
        with pytest.raises(TypeError, match=r"normalize must be a bool"):
            structure_ops.clip_loss(a, a, 1.0, normalize=1, backend=backend)


# ---------------------------------------------------------------------------------------------------
# kNN, mutual kNN, CKA
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("k", "error", "message"),
    [
        (0, ValueError, r"k must satisfy 1 <= k <= N - 1 = 9 \(diagonal excluded\), got k=0"),
        (10, ValueError, r"k must satisfy 1 <= k <= N - 1 = 9"),
        (-3, ValueError, r"k must satisfy"),
        ("median", ValueError, r"k must be an int or one of \['rice', 'sqrt', 'sturges'\], got 'median'"),
        (True, TypeError, r"k must be an int or one of"),
        (2.5, TypeError, r"k must be an int or one of"),
    ],
)
def test_bad_k(backend, k, error, message):
    a = torch.randn(10, 3, dtype=F64)
    with pytest.raises(error, match=message):
        structure_ops.knn(a, k, backend=backend)
    with pytest.raises(error, match=message):
        structure_ops.mutual_knn(a, a, k, backend=backend)


def test_metric_input_errors():
    a = torch.randn(10, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"a and b must have the same number of rows N"):
        structure_ops.mutual_knn(a, a[:9])
    with pytest.raises(ValueError, match=r"a and b must be on the same device"):
        structure_ops.mutual_knn(a, a.to("meta"))
    with pytest.raises(ValueError, match=r"b must be a 2-D"):
        structure_ops.mutual_knn(a, a[0])
    with pytest.raises(ValueError, match=r"a needs N >= 2 rows"):
        structure_ops.knn(a[:1], 1)
    with pytest.raises(TypeError, match=r"a must have a floating-point dtype"):
        structure_ops.knn(a.int(), 2)
    with pytest.raises(ValueError, match=r"a and b must have the same number of rows N"):
        structure_ops.cka(a, a[:9])
    with pytest.raises(ValueError, match=r"a needs N >= 4 rows"):
        structure_ops.cka(a[:3], a[:3], unbiased=True)
    assert torch.isfinite(structure_ops.cka(a[:3], a[:3]))  # the biased form is defined from N = 2


def test_cpu_multilevel_refuses_when_powers_cannot_fit():
    """levels > 1 materializes N × N powers: a clear error with the estimate, before allocating anything big."""
    x = torch.ones(60_000, 2)
    x[:, 1] = torch.arange(60_000.0)
    with pytest.raises(RuntimeError, match=r"levels=50 materializes about .* GiB of N x N matrices at N=60000"):
        structure_ops.structure_loss(x, x.clone(), levels=50, backend="cpu")


def test_raw_ops_check_their_inputs():
    """C++ checks always carry a message naming the argument (users may call torch.ops directly)."""
    ops = torch.ops.structure_ops
    x = torch.randn(5, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"x must be a 2-D \(N, d\) tensor"):
        ops.structure_fwd(x[0], x, 1, 0.1, 0, 0.0, 0, 1.0, 0, 1e-12, False, False)
    with pytest.raises(RuntimeError, match=r"x and z must have the same number of rows N"):
        ops.structure_fwd(x, x[:4], 1, 0.1, 0, 0.0, 0, 1.0, 0, 1e-12, False, False)
    with pytest.raises(RuntimeError, match=r"levels must be >= 1"):
        ops.structure_fwd(x, x, 0, 0.1, 0, 0.0, 0, 1.0, 0, 1e-12, False, False)
    with pytest.raises(RuntimeError, match=r"temperature must be > 0"):
        ops.structure_fwd(x, x, 1, 0.0, 0, 0.0, 0, 1.0, 0, 1e-12, False, False)
    with pytest.raises(RuntimeError, match=r"unknown weighting code"):
        ops.structure_fwd(x, x, 1, 0.1, 7, 0.0, 0, 1.0, 0, 1e-12, False, False)
    with pytest.raises(RuntimeError, match=r"logit_scale must hold exactly one value"):
        ops.clip_fwd(x, x, torch.ones(2, dtype=F64))
    with pytest.raises(RuntimeError, match=r"image and text must have the same embedding width"):
        ops.clip_fwd(x, x[:, :2], torch.ones((), dtype=F64))
    with pytest.raises(RuntimeError, match=r"k must satisfy 1 <= k <= N - 1 = 4"):
        ops.knn(x, 5)
    with pytest.raises(RuntimeError, match=r"a needs at least N = 2 rows"):
        ops.knn(x[:1], 1)


# ---------------------------------------------------------------------------------------------------
# Finite inputs never give NaN/Inf; non-finite inputs propagate
# ---------------------------------------------------------------------------------------------------
def _degenerate_inputs():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(12, 5, generator=g, dtype=F64)
    cases = {}
    z = base.clone()
    z[3] = 0
    z[7] = 0
    cases["zero_rows"] = z
    z = base.clone()
    z[5] = z[2]
    z[6] = z[2]
    cases["duplicate_rows"] = z
    z = base.clone()
    z[1] *= 1e6 / z[1].norm()
    z[4] *= 1e6 / z[4].norm()
    cases["norm_1e6_rows"] = z
    z = base.clone()
    z[:, 2] = 0.0
    cases["zero_column"] = z
    cases["n2"] = base[:2]
    cases["n2_same"] = base[:1].repeat(2, 1)
    cases["all_zero"] = torch.zeros(12, 5, dtype=F64)
    return cases


DEGENERATE = _degenerate_inputs()
FINITE_OPTIONS = [
    dict(),
    dict(temperature=1e-3),
    dict(temperature=1e-3, divergence="js"),
    dict(temperature=1e-3, levels=3, weighting="inverse"),
    dict(temperature=1e-3, levels=2, divergence="js"),
    dict(similarity="rbf", gamma=50.0),
    dict(centering="standard"),
    dict(centering="none", temperature=1e-3),
    dict(center_first=True, temperature=1e-3),
    dict(center_first=True, centering="standard"),
]


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_structure_finite_inputs_give_finite_outputs(case, backend, dtype):
    z0 = DEGENERATE[case].to(dtype)
    x0 = structured(z0.shape[0], 4, 3, seed=12)[0].to(dtype)
    for options in FINITE_OPTIONS:
        for xv, zv in ((x0, z0), (z0, z0)):  # the degenerate matrix on one side, then on both
            x, z = xv.clone().requires_grad_(), zv.clone().requires_grad_()
            loss = structure_ops.structure_loss(x, z, backend=backend, **options)
            gx, gz = torch.autograd.grad(loss, (x, z))
            ok = torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gz).all()
            assert ok, (options, loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_standard_centering_of_identical_rows_is_finite(backend):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 5, generator=g, dtype=F64).repeat(12, 1).requires_grad_()
    x = structured(12, 4, 3)[0]
    loss = structure_ops.structure_loss(x, z, centering="standard", backend=backend)
    (gz,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(gz).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
def test_clip_finite_inputs_give_finite_outputs(backend, dtype, normalize):
    for case, z in DEGENERATE.items():
        if case == "norm_1e6_rows" and not normalize:
            z = z.clone()
            z[1] /= 1e3  # unnormalized rows of norm 1e3 with s = 1e3: logits ~1e9, still finite
            z[4] /= 1e3
        image = z.to(dtype).requires_grad_()
        text = structured(z.shape[0], 4, 5, seed=13)[1].to(dtype).requires_grad_()
        for scale in (20.0, 1e3):
            s = torch.tensor(scale, dtype=dtype, requires_grad=True)
            loss = structure_ops.clip_loss(image, text, s, normalize=normalize, backend=backend)
            grads = torch.autograd.grad(loss, (image, text, s))
            assert torch.isfinite(loss), (case, scale)
            assert all(torch.isfinite(g).all() for g in grads), (case, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", [dict(), dict(levels=2), dict(divergence="js"), dict(similarity="rbf")], ids=str)
def test_nan_input_gives_nan_loss(backend, dtype, options):
    x, z = structured(10, 4, 3, seed=14)
    z = z.to(dtype)
    z[2, 1] = float("nan")
    z.requires_grad_()
    loss = structure_ops.structure_loss(x.to(dtype), z, backend=backend, **options)
    assert torch.isnan(loss)
    (gz,) = torch.autograd.grad(loss, z)
    assert not torch.isfinite(gz).all()  # a NaN loss never comes with a clean gradient


def test_nan_input_gradient_matches_reference_cpu_level1():
    x, z = structured(10, 4, 3, seed=14)
    z[2, 1] = float("nan")
    grads = {}
    for backend in BACKENDS:
        xx, zz = x.clone().requires_grad_(), z.clone().requires_grad_()
        grads[backend] = torch.autograd.grad(structure_ops.structure_loss(xx, zz, backend=backend), (xx, zz))
    assert torch.isnan(grads["reference"][0]).all() and torch.isnan(grads["reference"][1]).all()
    assert torch.isnan(grads["cpu"][0]).all() and torch.isnan(grads["cpu"][1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_clip_and_metrics_propagate(backend):
    a = torch.randn(6, 3, dtype=F64)
    b = a.clone()
    b[0, 0] = float("inf")
    assert torch.isnan(structure_ops.clip_loss(a, b, 20.0, backend=backend))
    b[0, 0] = float("nan")
    assert torch.isnan(structure_ops.clip_loss(a, b, 20.0, backend=backend))
    assert torch.isnan(structure_ops.mutual_knn(a, b, 2, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mutual_knn_large_finite_half_inputs_are_finite(backend):
    g = torch.Generator().manual_seed(0)
    a = (1e3 * torch.rand(100, 64, generator=g, dtype=F64)).half()  # |x| ≤ 1e3, row norms ≤ 8e3: finite in fp16
    b = (1e3 * torch.rand(100, 64, generator=g, dtype=F64)).half()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    expected = reference.mutual_knn(a.double(), b.double(), 5).item()
    got = structure_ops.mutual_knn(a, b, 5, backend=backend)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected, abs=0.1)  # fp16 normalization may move a few neighbours
