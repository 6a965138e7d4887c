"""siglip_loss (pairwise sigmoid loss) on every backend that runs here, against the float64 oracle.

The oracle (structure_ops.reference.siglip_loss) is first checked against a direct transcription of the
definition in Python floats and against its own documented analytic gradient; then every backend (cpu, triton in
the interpreter, cuda when a GPU is present) is compared with it in float64 (≤ 1e-10) and float32 (≤ 1e-5
relative) on awkward shapes, values and all four gradients with grad_output ≠ 1; the op boundary (opcheck,
fullgraph compile), the modules, the numerics of large logits, bad inputs, and bounded memory at N = 16 384.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import F64, rel_err, structured

import structure_ops
from structure_ops import reference

pytestmark = pytest.mark.usefixtures("cpu_ext")

GRAD = 1.7  # grad_output ≠ 1: the backward must scale the gradients computed in forward
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ops = torch.ops.structure_ops


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()


def _backends() -> list:
    out = ["cpu"]
    out.append(pytest.param("triton", marks=pytest.mark.skipif(not _have_triton(), reason="triton is not installed")))
    gpu = torch.cuda.is_available() and structure_ops._ops.extension_error("_C_cuda") is None
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(not gpu, reason="needs a CUDA GPU and structure_ops._C_cuda")))
    return out


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _pairs(n: int, d: int, seed: int = 0):
    """Correlated (image, text) rows in float64: row i of text is a noisy copy of row i of image, so the
    positives' logits are large and the negatives' spread (both branches of the stable log-sigmoid)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=F64)
    b = a + 0.8 * torch.randn(n, d, generator=g, dtype=F64)
    return a, b


def _value_and_grads(fn, a, b, s, beta):
    """fn(a, b, s, β) and the gradients of GRAD·fn w.r.t. all four (detached copies; s, β as 0-dim tensors)."""
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    beta = beta.detach().clone().requires_grad_()
    loss = fn(a, b, s, beta)
    return (loss.detach(), *torch.autograd.grad(GRAD * loss, (a, b, s, beta)))


def _oracle(a, b, s, beta, normalize=True):
    """The float64 oracle on the (rounded) inputs the backend sees."""
    return _value_and_grads(
        lambda a, b, s, beta: reference.siglip_loss(a, b, s, beta, normalize=normalize),
        a.detach().cpu().double(), b.detach().cpu().double(), torch.tensor(float(s), dtype=F64),
        torch.tensor(float(beta), dtype=F64),
    )  # fmt: skip


def _check(out, ref, tol, what=""):
    names = ("loss", "d_image", "d_text", "d_scale", "d_bias")
    for name, o, r in zip(names, out, ref, strict=True):
        assert torch.isfinite(o).all(), f"{what} {name} not finite"
        assert rel_err(o.cpu(), r) <= tol, f"{what} {name}: rel err {rel_err(o.cpu(), r):.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------------
def test_reference_matches_the_definition():
    """−(1/N) Σ_ij log σ(y_ij (s â_i·b̂_j + β)) written out with Python floats (open_clip's normalization: N, not N²)."""
    a, b = _pairs(4, 3, seed=1)
    s, beta = 7.5, -2.25
    an = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in a.tolist()]
    bn = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in b.tolist()]
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = s * sum(u * v for u, v in zip(an[i], bn[j], strict=True)) + beta
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))  # −log σ(y z)
    expected = total / 4
    got = reference.siglip_loss(a, b, torch.tensor(s, dtype=F64), torch.tensor(beta, dtype=F64))
    assert got.item() == pytest.approx(expected, rel=1e-14)
    # numbers work too, and normalize=False uses the raw rows
    raw = reference.siglip_loss(torch.tensor(an, dtype=F64), torch.tensor(bn, dtype=F64), s, beta, normalize=False)
    assert raw.item() == pytest.approx(expected, rel=1e-14)


def test_reference_analytic_gradient_and_gradcheck():
    """The docstring's gradients w = −yσ(−yz)/N, dâ = s·w b̂, db̂ = s·wᵀâ, ds = Σ w âb̂ᵀ, dβ = Σ w against autograd."""
    a, b = _pairs(6, 4, seed=2)
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s, beta = torch.tensor(5.0, dtype=F64), torch.tensor(-3.0, dtype=F64)
    _, ga, gb, gs, gbeta = _value_and_grads(
        lambda a, b, s, beta: reference.siglip_loss(a, b, s, beta, normalize=False), a, b, s, beta
    )
    p = a @ b.T
    z = s * p + beta
    y = 2 * torch.eye(6, dtype=F64) - 1
    w = -y * torch.sigmoid(-y * z) / 6
    for got, want in ((ga, s * w @ b), (gb, s * w.T @ a), (gs, (w * p).sum()), (gbeta, w.sum())):
        assert rel_err(got, GRAD * want) <= 1e-13
    args = (a.clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_(), beta.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: reference.siglip_loss(*t), args)


# ---------------------------------------------------------------------------------------------------
# Every backend against the oracle
# ---------------------------------------------------------------------------------------------------
SHAPES = [(2, 3), (7, 64), (127, 3), (129, 130)]  # N not a multiple of any block, d below/above block widths


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("n", "d"), SHAPES, ids=[f"{n}x{d}" for n, d in SHAPES])
def test_matches_oracle(backend, dtype, n, d, tiny_panels):
    a64, b64 = _pairs(n, d, seed=n + d)
    dev = _device(backend)
    a, b = a64.to(dev, dtype), b64.to(dev, dtype)
    s, beta = torch.tensor(12.0, dtype=dtype, device=dev), torch.tensor(-4.5, dtype=dtype, device=dev)
    out = _value_and_grads(lambda *t: structure_ops.siglip_loss(*t, backend=backend), a, b, s, beta)
    assert out[0].dtype == dtype and out[0].shape == ()
    _check(out, _oracle(a, b, s, beta), TOL[dtype], f"{backend} {dtype} {n}x{d}")


@pytest.mark.parametrize("backend", _backends())
def test_non_contiguous_raw_rows_and_paper_init(backend):
    """Transposed / strided views, normalize=False, and the paper's initial s = 10, β = −10."""
    n, d = 37, 9
    a64, b64 = _pairs(n, 2 * d, seed=3)
    dev = _device(backend)
    a = F.normalize(a64, dim=1).to(dev).T.contiguous().T[:, ::2]  # non-contiguous, rows not unit norm
    b = F.normalize(b64, dim=1).to(dev).T.contiguous().T[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    s, beta = torch.tensor(10.0, dtype=F64, device=dev), torch.tensor(-10.0, dtype=F64, device=dev)
    out = _value_and_grads(lambda *t: structure_ops.siglip_loss(*t, normalize=False, backend=backend), a, b, s, beta)
    _check(out, _oracle(a, b, s, beta, normalize=False), TOL[F64], backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision(backend, dtype):
    """Half inputs: fp32 products and statistics; the oracle on the rounded inputs bounds what remains."""
    a64, b64 = _pairs(33, 17, seed=4)
    dev = _device(backend)
    a, b = F.normalize(a64, dim=1).to(dev, dtype), F.normalize(b64, dim=1).to(dev, dtype)
    s, beta = torch.tensor(10.0, device=dev), torch.tensor(-10.0, device=dev)
    out = _value_and_grads(lambda *t: structure_ops.siglip_loss(*t, normalize=False, backend=backend), a, b, s, beta)
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[3].dtype == torch.float32
    _check(out, _oracle(a, b, s, beta, normalize=False), 1e-2, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(("s", "beta"), [(1e4, 0.0), (1e4, -1e4), (3e3, 50.0)])
def test_large_logits_are_stable(backend, dtype, s, beta):
    """|z| up to ~2e4: the stable log-sigmoid gives finite values and gradients that match the oracle (a
    naive log(sigmoid(z)) is −inf there and its gradient NaN)."""
    a64, b64 = _pairs(19, 8, seed=5)
    dev = _device(backend)
    a, b = F.normalize(a64, dim=1).to(dev, dtype), F.normalize(b64, dim=1).to(dev, dtype)
    st, bt = torch.tensor(s, device=dev), torch.tensor(beta, device=dev)
    out = _value_and_grads(lambda *t: structure_ops.siglip_loss(*t, normalize=False, backend=backend), a, b, st, bt)
    ref = _oracle(a, b, st, bt, normalize=False)
    assert math.isfinite(ref[0].item()) and ref[0].item() > 1.0
    _check(out, ref, 1e-5 if dtype == torch.float32 else 2e-3, f"{backend} {dtype} s={s} β={beta}")


@pytest.mark.parametrize("backend", ["reference", *_backends()])
def test_non_finite_input_propagates(backend):
    a, b = _pairs(9, 5, seed=6)
    dev = "cpu" if backend == "reference" else _device(backend)
    a, b = a.to(dev), b.to(dev)
    a[3, 1] = float("nan")
    assert torch.isnan(structure_ops.siglip_loss(a, b, 10.0, -10.0, backend=backend))


def test_row_shard_offsets_sum_to_the_loss():
    """The op's row-shard contract (used by structure_ops.distributed): the parts over row ranges sum to the loss
    and to every gradient; an empty shard contributes exactly 0."""
    n, d = 23, 6
    a, b = (F.normalize(t, dim=1) for t in _pairs(n, d, seed=7))
    s, beta = torch.tensor(9.0, dtype=F64), torch.tensor(-6.0, dtype=F64)
    full = ops.siglip_fwd(a, b, s, beta, 0, True, True)
    fwd = [ops.siglip_fwd]
    if _have_triton():
        fwd.append(ops.triton_siglip_fwd)
    for op in fwd:
        parts = [op(a[lo:hi], b, s, beta, lo, True, True) for lo, hi in ((0, 10), (10, 10), (10, 23))]
        assert parts[1][0].item() == 0.0 and torch.count_nonzero(parts[1][2]) == 0
        assert rel_err(sum(p[0] for p in parts), full[0]) <= 1e-12
        assert rel_err(torch.cat([p[1] for p in parts]), full[1]) <= 1e-12
        for k in (2, 3, 4):
            assert rel_err(sum(p[k] for p in parts), full[k]) <= 1e-12
        with pytest.raises(RuntimeError, match=r"row_offset \+ M <= N, got row_offset=20, M=5, N=23"):
            op(a[:5], b, s, beta, 20, True, True)


# ---------------------------------------------------------------------------------------------------
# The op boundary
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("grad_image", "grad_text"), [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("op_name", ["siglip_fwd", "triton_siglip_fwd"])
def test_opcheck(op_name, grad_image, grad_text):
    if op_name.startswith("triton") and not _have_triton():
        pytest.skip("triton is not installed")
    a, b = (F.normalize(t, dim=1) for t in _pairs(6, 5, seed=8))
    a = a.T.contiguous().T.requires_grad_(grad_image)  # non-contiguous: the fake must describe real strides
    b = b.requires_grad_(grad_text)
    s = torch.tensor(8.0, dtype=F64, requires_grad=True)
    beta = torch.full((1,), -3.0, dtype=F64, requires_grad=True)
    torch.library.opcheck(getattr(ops, op_name), (a, b, s, beta, 0, grad_image, grad_text))


def test_direct_op_call_grad_flags_guard():
    a, b = (F.normalize(t, dim=1) for t in _pairs(6, 5, seed=8))
    a.requires_grad_()
    loss = ops.siglip_fwd(a, b, torch.tensor(8.0, dtype=F64), torch.tensor(-3.0, dtype=F64), 0, False, False)[0]
    with pytest.raises(RuntimeError, match="grad_image/grad_text"):
        loss.backward()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("normalize", [True, False])
def test_compile_fullgraph(backend, normalize, dynamo_reset):
    a, b = _pairs(12, 5, seed=9)
    s, beta = torch.tensor(9.0, dtype=F64), torch.tensor(-5.0, dtype=F64)

    def fn(a, b, s, beta):
        return structure_ops.siglip_loss(a, b, s, beta, normalize=normalize, backend=backend)

    eager = _value_and_grads(fn, a, b, s, beta)
    compiled = _value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), a, b, s, beta)
    _check(eager, _oracle(a, b, s, beta, normalize=normalize), 1e-12)
    for u, v in zip(compiled, eager, strict=True):
        assert rel_err(u, v) <= 1e-12


def test_compile_training_step_with_structure_siglip(dynamo_reset):
    crit = structure_ops.StructureSigLipLoss(lam=2.0, warmup=0, backend="cpu").double()
    x_img, x_txt = structured(16, 6, 5, seed=7)
    w = torch.linspace(-1, 1, 24, dtype=F64)
    a = (x_img @ w.reshape(6, 4)).requires_grad_()
    b = (x_txt @ w[:20].reshape(5, 4)).requires_grad_()
    params = (a, b, crit.clip.log_logit_scale, crit.clip.logit_bias)

    def step(a, b):
        return crit(a, b, x_img, x_txt, step=10).loss

    eager = step(a, b)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(a, b)
    g_comp = torch.autograd.grad(compiled, params)
    assert rel_err(compiled, eager) <= 1e-12
    for u, v in zip(g_comp, g_eager, strict=True):
        assert rel_err(u, v) <= 1e-12


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------
def test_siglip_module_init_and_gradients():
    m = structure_ops.SigLipLoss(backend="cpu").double()
    assert [n for n, _ in m.named_parameters()] == ["log_logit_scale", "logit_bias"]
    assert m.logit_scale.item() == pytest.approx(10.0) and m.logit_bias.item() == -10.0  # the SigLIP paper's init
    a, b = _pairs(10, 4, seed=10)
    loss = m(a, b)
    loss.backward()
    s = torch.tensor(math.log(10.0), dtype=F64, requires_grad=True)
    beta = torch.tensor(-10.0, dtype=F64, requires_grad=True)
    ref = reference.siglip_loss(a, b, s.exp(), beta)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-6  # the parameters are fp32: log 10 rounded
    assert rel_err(m.log_logit_scale.grad, s.grad) <= 1e-5 and rel_err(m.logit_bias.grad, beta.grad) <= 1e-6
    fixed = structure_ops.SigLipLoss(math.log(5.0), 1.5, learnable=False, backend="cpu")
    assert not list(fixed.parameters()) and fixed.log_logit_scale.dtype == F64
    assert rel_err(fixed(a, b), reference.siglip_loss(a, b, 5.0, 1.5)) <= 1e-12
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        structure_ops.SigLipLoss(backend="gpu")
    with pytest.raises(ValueError, match="init_logit_bias must be finite"):
        structure_ops.SigLipLoss(init_logit_bias=float("nan"))


def test_structure_siglip_module_warmup_and_extra_rows():
    """StructureClipLoss's warm-up and extra rows around a SigLIP term: L = L_siglip + λ_t · ½ (R_img + R_txt)."""
    fi, ei = structured(12, 6, 4, seed=13)
    ft, et = structured(12, 5, 4, seed=14)
    xfi, xei = structured(3, 6, 4, seed=15)
    xft, xet = structured(3, 5, 4, seed=16)
    crit = structure_ops.StructureSigLipLoss(lam=3.0, warmup=4, backend="cpu", levels=2).double()
    out = crit(ei, et, fi, ft, step=3, image_extra=(xfi, xei), text_extra=(xft, xet))
    lam_t = 3.0 * 2 / 4
    sig = reference.siglip_loss(ei, et, math.exp(crit.clip.log_logit_scale.item()), crit.clip.logit_bias.item())
    r_img = reference.structure_loss(torch.cat([fi, xfi]), torch.cat([ei, xei]), levels=2)
    r_txt = reference.structure_loss(torch.cat([ft, xft]), torch.cat([et, xet]), levels=2)
    assert out.lambda_t == lam_t
    assert rel_err(out.clip, sig) <= 1e-12
    assert rel_err(out.loss, sig + lam_t * 0.5 * (r_img + r_txt)) <= 1e-12
    first = crit(ei, et, fi, ft, step=1)
    assert first.lambda_t == 0.0 and rel_err(first.loss, sig) <= 1e-12
    assert isinstance(crit.clip, structure_ops.SigLipLoss)


# ---------------------------------------------------------------------------------------------------
# Bad inputs: the same errors as clip_loss (shared validation), plus logit_bias
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_bad_inputs(backend):
    a = torch.ones(4, 3, dtype=F64)
    cases = [
        ((a, torch.ones(5, 3, dtype=F64), 1.0, 0.0), ValueError, r"image and text must have the same number of rows N"),
        ((a, torch.ones(4, 5, dtype=F64), 1.0, 0.0), ValueError, r"image and text must have the same width"),
        ((a, a[0], 1.0, 0.0), ValueError, r"text must be a 2-D \(N, d\) tensor"),
        ((a.long(), a.long(), 1.0, 0.0), TypeError, r"image must have a floating-point dtype"),
        ((a[:1], a[:1], 1.0, 0.0), ValueError, r"image needs N >= 2 rows"),
        ((a, a, torch.ones(2, dtype=F64), 0.0), ValueError, r"logit_scale must be a scalar \(one element\)"),
        ((a, a, 1.0, torch.ones(2, dtype=F64)), ValueError, r"logit_bias must be a scalar \(one element\)"),
        ((a, a, 1.0, torch.tensor(3)), TypeError, r"logit_bias must have a floating-point dtype"),
        ((a, a, 1.0, "b"), TypeError, r"logit_bias must be a one-element tensor or a number, got str"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            structure_ops.siglip_loss(*args, backend=backend)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        structure_ops.siglip_loss(a, a, 1.0, 0.0, normalize=1, backend=backend)
    # the same message as clip_loss for the same mistake
    for fn in (lambda: structure_ops.clip_loss(a, a[:3], 1.0), lambda: structure_ops.siglip_loss(a, a[:3], 1.0, 0.0)):
        with pytest.raises(ValueError, match=r"image and text must have the same number of rows N: image has shape \(4, 3\)"):
            fn()


def test_unavailable_backend_lists_every_reason():
    a = torch.ones(4, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"(?s)siglip_loss: inputs .*backend='cuda' cannot run them:.*cpu: available"):
        structure_ops.siglip_loss(a, a + 1, 10.0, -10.0, backend="cuda")


def test_direct_op_checks():
    a = torch.ones(4, 3, dtype=F64)
    s, beta = torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64)
    with pytest.raises(RuntimeError, match=r"logit_bias must hold exactly one value, got shape \[2\]"):
        ops.siglip_fwd(a, a, s, torch.zeros(2, dtype=F64), 0, True, True)
    with pytest.raises(RuntimeError, match=r"image and text must have the same embedding width"):
        ops.siglip_fwd(a, a[:, :2], s, beta, 0, True, True)
    with pytest.raises(RuntimeError, match=r"row_offset \+ M <= N"):
        ops.siglip_fwd(a, a, s, beta, 1, True, True)


# ---------------------------------------------------------------------------------------------------
# Bounded memory at N = 16 384 on the CPU
# ---------------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, torch, structure_ops
    torch.manual_seed(0)
    n, d = 16384, 32
    a = torch.randn(n, d, requires_grad=True)
    b = (a.detach() + 0.5 * torch.randn(n, d)).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    beta = torch.tensor(-10.0, requires_grad=True)
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
    structure_ops.siglip_loss(a[:64], b[:64], s, beta, backend="cpu").backward()  # warm-up (threads, allocator)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = status("VmRSS:")
    loss = structure_ops.siglip_loss(a, b, s, beta, backend="cpu")
    loss.backward()
    peak = status("VmHWM:")
    print(json.dumps({"loss": loss.item(), "extra": peak - before, "finite": bool(torch.isfinite(a.grad).all())}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_n16384_runs_in_bounded_memory():
    """N = 16 384 (d = 32) forward + backward in a fresh process: the peak RSS growth stays far below one
    N × N fp32 matrix (1 GiB), the bound being the 32 MiB row panel plus O(N·d) gradients."""
    env = {**os.environ, "STRUCTURE_OPS_BACKEND": ""}
    env.pop("STRUCTURE_OPS_CPU_PANEL_MB", None)
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.strip().splitlines()[-1])
    nn_bytes = 16384 * 16384 * 4
    assert out["finite"] and math.isfinite(out["loss"])
    assert out["extra"] < 160 * 2**20, f"peak RSS grew by {out['extra'] / 2**20:.0f} MiB (one N×N fp32: {nn_bytes / 2**20:.0f} MiB)"


# ---------------------------------------------------------------------------------------------------
# Training layer: --loss siglip
# ---------------------------------------------------------------------------------------------------
def test_trainer_with_siglip_loss(tmp_path):
    from structure_ops.train.trainer import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    z = torch.randn(96, 6, generator=g)
    xi, xt = torch.tanh(z @ torch.randn(6, 20, generator=g)), torch.tanh(z @ torch.randn(6, 14, generator=g))
    cfg = TrainConfig(dim=8, lam=2.0, warmup=3, lr=3e-3, epochs=8, batch_size=32, patience=50, head="linear",
                      checkpoint_every=0, loss="siglip", backend="cpu")  # fmt: skip
    trainer = Trainer(cfg, xi[:72], xt[:72], xi[72:], xt[72:], out_dir=tmp_path, progress=False)
    res = trainer.fit()
    assert res.history[-1]["train_clip"] < res.history[0]["train_clip"]  # the SigLIP term (the "clip" field) falls
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["objective"]["clip.logit_bias"].item() != -10.0  # the SigLIP bias is a learned parameter
    with pytest.raises(ValueError, match="loss must be 'clip' or 'siglip'"):
        TrainConfig(loss="sigmoid")


def test_cli_accepts_loss_siglip():
    from structure_ops import cli

    parser = cli.build_parser()
    a = parser.parse_args(["train", "--run", "r", "--loss", "siglip"])
    assert a.loss == "siglip"
    assert parser.parse_args(["train", "--run", "r"]).loss == "clip"
