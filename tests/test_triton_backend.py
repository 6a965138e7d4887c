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
        # at the suite's precision "high" the Triton kernels round fp32 operands to tf32 (also in the interpreter):
        # the suite's tolerance comes from the float64 hardware model of those operands
        assert checks[p].get("ok") is True and checks[p]["rel_err"] <= checks[p]["tol"], checks[p]
    assert any("median_s" in r and r["provider"] == "triton_rows" for r in data["records"])


# ---------------------------------------------------------------------------------------------------------
# Every launch under a device guard; every launch configuration derived from the modules' config functions
# ---------------------------------------------------------------------------------------------------------
def _kernel_modules():
    from structure_ops._triton import clip, knn, siglip, structure, structure_flash

    return {"structure": structure, "structure_flash": structure_flash, "clip": clip, "knn": knn, "siglip": siglip}


class _Recorder:
    """Stands in for a module's kernel: records (kernel, guarded device, tensors' device, constexprs/options) of
    each launch, then launches the real kernel."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        from structure_ops._triton._common import guarded_device

        def launch(*args, **kwargs):
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            self.log.append((self.name, guarded_device(), devices, dict(kwargs)))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch):
    """Replace every Triton kernel of every kernel module by a recorder; yields the launch log."""
    from triton.runtime.jit import KernelInterface

    log = []
    for mod_name, mod in _kernel_modules().items():
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, KernelInterface) and attr in {getattr(e[0], "fn", e[0]).__name__ for e in mod.AOT_KERNELS}:
                monkeypatch.setattr(mod, attr, _Recorder(f"{mod_name}.{attr}", obj, log))
    yield log


def _drive_every_launch_path():
    """Run each host launch path of each kernel module once (tiny shapes, interpreter or GPU)."""
    from structure_ops._triton import clip, knn, structure, structure_flash

    x, z = _xz(n=9, dx=5, dz=4)
    xh, zh = R.prepare(x), R.prepare(z)
    for sim in (0, 1):
        structure_flash.structure_level1_flash(xh, zh, 0.1, sim, 1.0, 0, 1e-12, True, True)
        for levels in (1, 2):
            structure.structure_fwd(xh, zh, levels, 0.1, 0, 0.0, sim, 1.0, 0, 1e-12, True, True, mode="rows")
    a = torch.nn.functional.normalize(x, dim=1)
    s = torch.tensor(5.0, device=DEV)
    _, r, c = clip.clip_fwd(a, a.flip(0).contiguous(), s)
    clip.clip_bwd(torch.tensor(1.0, device=DEV), a, a.flip(0).contiguous(), s, r, c)
    knn.knn(a, 3)
    from structure_ops._triton import siglip

    siglip.siglip_fwd(a, a.flip(0).contiguous(), s, torch.tensor(-1.0, device=DEV))


@needs_kernels
def test_every_launch_runs_under_a_device_guard(launches):
    # Triton launches on the CURRENT CUDA device; a tensor on another device must have its device made current
    # (torch.cuda.device). The guard helper records the guarded device: a launch outside any guard sees None.
    _drive_every_launch_path()
    assert launches
    for name, guarded, devices, _ in launches:
        assert guarded is not None, f"{name} launched outside a device guard"
        assert devices == {guarded}, f"{name}: guard for {guarded}, tensors on {devices}"
    launched = {name for name, *_ in launches}
    for mod_name, mod in _kernel_modules().items():  # every kernel of every module took part
        kernels = {f"{mod_name}.{getattr(e[0], 'fn', e[0]).__name__}" for e in mod.AOT_KERNELS}
        assert kernels <= launched, kernels - launched


def test_device_guard_is_a_noop_on_cpu_and_nests():
    from structure_ops._triton._common import device_guard, guarded_device

    assert guarded_device() is None
    with device_guard(torch.device("cpu")):
        assert guarded_device() == torch.device("cpu")
        with device_guard("cpu"):
            assert guarded_device() == torch.device("cpu")
    assert guarded_device() is None


def _aot_keys(mod):
    return {(getattr(k, "fn", k).__name__, tuple(sorted(sig.items())), tuple(sorted(c.items())),
             tuple(sorted(o.items()))) for k, sig, c, o in mod.AOT_KERNELS}  # fmt: skip


@needs_kernels
def test_launches_take_their_configuration_from_the_config_functions(launches):
    # What the host launches (constexprs and options) is exactly what the module's config function returns for
    # those inputs (here with interpret=INTERPRET): the AOT set, built from the same functions, is what runs.
    from structure_ops._triton import clip, knn, structure, structure_flash
    from structure_ops._triton._common import INTERPRET

    _drive_every_launch_path()
    n, dx, dz = 9, 5, 4
    expect = []
    for sim in (0, 1):
        cfg = structure_flash.launch_config(n, dx, dz, torch.float32, similarity=sim, divergence=0, grad_x=True,
                                            grad_z=True, interpret=INTERPRET)  # fmt: skip
        for key in ("lse", "lse", "loss", "grad_z", "grad_x"):
            expect.append(("structure_flash._" + {"lse": "lse", "loss": "loss"}.get(key, "grad") + "_kernel",
                           {**cfg[key]["constexprs"], **cfg[key]["options"]}))  # fmt: skip
        for levels in (1, 2):
            # one panel of all N rows at this N (the panel budget is ≫ N²)
            c = structure.rows_config(n, n, 4, rbf=bool(sim), js=False, grad_x=True, grad_z=True, multilevel=levels > 1,
                                      interpret=INTERPRET)  # fmt: skip
            for key, kname in (("loss", "_rows_loss_kernel"), ("grad", "_rows_grad_kernel")):
                expect.append((f"structure.{kname}", {**c[key]["constexprs"], **c[key]["options"]}))
            for d in (dx, dz):
                c = structure.gram_config(n, n, d, torch.float32, rbf=bool(sim), interpret=INTERPRET)
                expect.append(("structure._gram_kernel", {**c["constexprs"], **c["options"]}))
                if levels == 1:
                    c = structure.grad_gemm_config(n, n, d, torch.float32, interpret=INTERPRET)
                    expect.append(("structure._grad_gemm_kernel", {**c["constexprs"], **c["options"]}))
            if levels > 1:
                c = structure.level_div_config(n, 4, js=False, grad_o=True, grad_a=True, interpret=INTERPRET)
                expect.append(("structure._level_div_kernel", {**c["constexprs"], **c["options"]}))
                c = structure.softmax_bwd_config(n, n, 4, rbf=bool(sim), interpret=INTERPRET)
                expect += [("structure._softmax_bwd_kernel", {**c["constexprs"], **c["options"]})] * 2
    for c, name in ((clip.fwd_config(5, torch.float32, interpret=INTERPRET), "_clip_fwd_kernel"),
                    (clip.merge_config(torch.float32, interpret=INTERPRET), "_clip_col_merge_kernel"),
                    (clip.bwd_config(5, torch.float32, interpret=INTERPRET), "_clip_bwd_kernel"),
                    (knn.fused_config(5, 4, torch.float32, interpret=INTERPRET, n=9), "_knn_topk_kernel")):  # fmt: skip
        mod = "clip" if "clip" in name else "knn"
        expect.append((f"{mod}.{name}", {**c["constexprs"], **c["options"]}))
    got = [(name, kw) for name, _, _, kw in launches if not name.startswith("siglip.")]  # siglip: its own tests
    for item in got:
        assert item in expect, f"{item[0]} launched with a configuration no config function returns: {item[1]}"
    for item in expect:
        assert item in got, f"{item[0]}: expected launch missing: {item[1]}"


def test_aot_set_covers_every_gpu_configuration():
    # The GPU configurations the config functions return for a random sweep of shapes, dtypes, precisions, options and
    # gradient flags are all in the AOT set (which aot.py compiles with --no-spills): nothing the host can launch on
    # a GPU escapes the spill check.
    import random

    from structure_ops._triton import clip, knn, structure, structure_flash
    from structure_ops._triton._common import PRECISIONS

    rng = random.Random(0)
    keys = {m: {(name, c, o) for name, _, c, o in _aot_keys(mod)} for m, mod in _kernel_modules().items()
            if m != "siglip"}  # fmt: skip

    def has(mod_name, kernel, cfg):
        return (kernel, tuple(sorted(cfg["constexprs"].items())), tuple(sorted(cfg["options"].items()))) in keys[mod_name]

    for _ in range(300):
        n, dx, dz, d = rng.randint(2, 300_000), rng.randint(1, 4096), rng.randint(1, 4096), rng.randint(1, 4096)
        prec = rng.choice(PRECISIONS)
        sim, div = rng.randint(0, 1), rng.randint(0, 1)
        gx, gz = rng.random() < 0.5, rng.random() < 0.5
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        cfg = structure_flash.launch_config(n, dx, dz, dtype, similarity=sim, divergence=div, grad_x=gx, grad_z=gz,
                                            precision=prec, interpret=False)  # fmt: skip
        for key, c in cfg.items():
            kernel = {"lse": "_lse_kernel", "loss": "_loss_kernel"}.get(key, "_grad_kernel")
            assert has("structure_flash", kernel, c), (key, n, dx, dz, dtype, prec, c)
        dtype4 = rng.choice([torch.float32, torch.bfloat16, torch.float16, torch.float64])
        assert has("clip", "_clip_fwd_kernel", clip.fwd_config(d, dtype4, prec, interpret=False)), (d, dtype4, prec)
        assert has("clip", "_clip_bwd_kernel", clip.bwd_config(d, dtype4, prec, interpret=False)), (d, dtype4, prec)
        assert has("clip", "_clip_col_merge_kernel", clip.merge_config(dtype4, interpret=False))
        kp = max(2, triton_next_pow2(rng.randint(1, knn.MAX_FUSED_K)))
        assert has("knn", "_knn_topk_kernel", knn.fused_config(d, kp, dtype, prec, interpret=False)), (d, kp, dtype)
        esize = 8 if dtype4 == torch.float64 else 4
        rows = rng.randint(1, n)
        for ml in (False, True):
            cfgs = structure.rows_config(n, rows, esize, rbf=bool(sim), js=bool(div), grad_x=gx, grad_z=gz,
                                         multilevel=ml, interpret=False)  # fmt: skip
            for key, c in cfgs.items():
                assert has("structure", {"loss": "_rows_loss_kernel", "grad": "_rows_grad_kernel"}[key], c), c
        assert has("structure", "_gram_kernel",
                   structure.gram_config(n, rows, d, dtype4, rbf=bool(sim), precision=prec, interpret=False))
        assert has("structure", "_grad_gemm_kernel",
                   structure.grad_gemm_config(rows, n, d, dtype4, precision=prec, interpret=False))
        assert has("structure", "_level_div_kernel",
                   structure.level_div_config(n, esize, js=bool(div), grad_o=gx, grad_a=gz, interpret=False))
        assert has("structure", "_softmax_bwd_kernel",
                   structure.softmax_bwd_config(n, rows, esize, rbf=bool(sim), interpret=False))


def triton_next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def test_aot_cli_fails_on_spills_and_codegen_errors(monkeypatch, capsys):
    # The CI gate itself: --no-spills turns a spill or a stack frame (or a missing ptxas report) on a checked target
    # into exit code 1; a report-only target never fails on spills; a codegen error always fails. (No compilation
    # here: compile_all is replaced by canned rows.)
    from structure_ops._triton import aot

    def rows(spill_90=0, stack_90=0, spill_80=0, ok=True, regs=True):
        base = {"module": "m", "kernel": "k", "config": "", "pointers": ["*fp32"], "options": {}, "seconds": 0.1,
                "wgmma": True, "mma": True}  # fmt: skip
        r90 = {**base, "cc": 90, "ok": ok, **({"regs": 100, "spill_bytes": spill_90, "stack_bytes": stack_90} if regs else {})}
        if not ok:
            r90["error"] = "CompilationError: x"
        r80 = {**base, "cc": 80, "ok": True, "regs": 100, "spill_bytes": spill_80, "stack_bytes": 0}
        return lambda targets, modules, jobs: [r for r in (r90, r80) if r["cc"] in targets]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cases = [
        (rows(), ["--targets", "90", "--no-spills"], 0),
        (rows(spill_90=8), ["--targets", "90", "--no-spills"], 1),
        (rows(stack_90=16), ["--targets", "90", "--no-spills"], 1),
        (rows(regs=False), ["--targets", "90", "--no-spills"], 1),
        (rows(spill_90=8), ["--targets", "90"], 0),
        (rows(spill_80=8), ["--targets", "90", "--report-targets", "80", "--no-spills"], 0),
        (rows(ok=False), ["--targets", "90"], 1),
    ]
    for fake, argv, code in cases:
        monkeypatch.setattr(aot, "compile_all", fake)
        assert aot.main(argv) == code, (argv, code)
    assert aot._targets(["80,90", "sm_90"]) == (80, 90)
    capsys.readouterr()


def test_aot_uses_each_modules_config_functions():
    # aot.py takes every module's entries from its aot_configs() (built from the launch/config functions), not from a
    # list of its own; every kernel module is in its list.
    from structure_ops._triton import aot

    mods = _kernel_modules()
    assert set(aot.MODULES) == set(mods)
    for name, mod in mods.items():
        assert hasattr(mod, "aot_configs"), name
        entries = {aot._entry_key(e) for e in aot.module_entries(name)}
        # the launch functions' entries, plus every config of the module's autotune spaces (if it declares any)
        assert {aot._entry_key(tuple(e)) for e in mod.aot_configs()} <= entries and len(mod.aot_configs()) > 0, name
        assert {aot._entry_key(tuple(e)) for e in getattr(mod, "aot_space_configs", list)()} <= entries, name
