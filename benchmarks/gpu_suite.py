"""GPU benchmark suite: correctness against the float64 oracle, then timings and peak memory, one command.

    python benchmarks/gpu_suite.py --targets --out DIR          # the headline numbers (benchmarks/gpu_run.sh stage 4)
    python benchmarks/gpu_suite.py --targets --smoke --out DIR  # the same code path on a CPU, tiny sizes
    python benchmarks/gpu_suite.py --out DIR                    # full sweeps of every op and provider
    python benchmarks/gpu_suite.py --smoke --out DIR            # sweeps at tiny sizes (CPU: Triton interpreter)

Providers (those that cannot run on the machine are recorded as skipped, with the reason):
  reference          eager structure_ops.reference (the paper's formulation, N × N matrices)
  compile_reference  torch.compile(reference) (inductor; --compile-backend to change)
  chunked            plain PyTorch in row chunks with activation checkpointing (the obvious memory fix)
  triton_rows        backend "triton", level-1 pass (a): row panels, gradient in forward
  triton_flash       backend "triton", level-1 pass (b): fused tiles, O(N) state
  triton             backend "triton" (clip, knn)
  cuda               backend "cuda" (the C++/CUDA extension), when built
  inf_cl             (clip only) the Inf-CL package's memory-efficient contrastive loss, when installed

Correctness first: every provider's value and gradients are compared with the float64 oracle at a small N on
fresh random structured inputs (the seed is recorded). The tolerance is derived, not guessed: the float64
hardware model (tests/emulation/hardware.py) computes the same loss with the GEMM operands rounded the way the
provider and the hardware round them (``operand_format``: tf32 for fp32 inputs at precision "high" in cuBLAS
and in the Triton kernels, which round explicitly, also in the interpreter; bf16/fp16 operands for half
inputs; fp32 for CPU GEMMs), and the tolerance is SAFETY × that emulated error, floored by what the model leaves out
(fp32 softmax/log math). Timings: the first call (compilation, memory), then repeats to fill a time target,
wall clock around a device synchronize; the median is reported. Peak memory: torch.cuda.max_memory_allocated
during the first call minus the memory held before it (inputs) and the outputs (loss and gradients).

--targets writes exactly two files into --out, atomically after every measurement (so a timeout keeps what
was measured): targets.json with the keys of TARGET_KEYS (numbers, null when not measured) and bench.json
with every check, record and the reason behind each null. Times are kept inside --budget-s: a measurement
predicted not to fit is skipped with the reason recorded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import _harness as H  # noqa: E402  (inputs and FLOP models shared with the CPU harness)
import roofline  # noqa: E402  (each record's roofline: model FLOPs / bytes, bound, fraction_of_bound)
from _gpu_run import TARGET_KEYS, validate_targets  # noqa: E402,F401  (the schema of targets.json)

PROVIDERS = ("reference", "compile_reference", "chunked", "triton_rows", "triton_flash", "triton", "cuda", "inf_cl")
SAFETY = 4.0  # tolerance = SAFETY × emulated error of the operand format
# What the hardware model leaves out (fp32 rounding of the softmax / log-sum-exp / divergence math and of the
# accumulators): relative floors on the value and on the gradients. The fp32 CPU path (no operand rounding at
# all) measures ~1e-7 on the value and ~1e-6 on the gradients at the check sizes.
VALUE_FLOOR = 2e-5
GRAD_FLOOR = 2e-4
HALF_DTYPES = ("bfloat16", "float16")


# ---------------------------------------------------------------------------------------------------
# the float64 hardware model (tests/emulation/hardware.py), loaded by path: the benchmarks are scripts of
# this repository, like the tests, and must not depend on a package named "tests" being importable
_HW: list = []


def hardware_model():
    """The hardware model module, or None when this checkout lacks it (tolerances are then not derived)."""
    if not _HW:
        path = os.path.join(REPO, "tests", "emulation", "hardware.py")
        mod = None
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("_structure_ops_hardware_model", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        _HW.append(mod)
    return _HW[0]


TRITON_PROVIDERS = ("triton_rows", "triton_flash", "triton")


def operand_format(dtype: str, device_type: str, precision: str, provider: str | None = None) -> str:
    """The GEMM operand format (hardware.py's ``fmt``) that ``provider`` gives ``dtype`` inputs on this device
    at this fp32 matmul precision."""
    if dtype in HALF_DTYPES:
        return {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    if dtype == "float64" or precision == "highest":
        return "fp64" if dtype == "float64" else "fp32"
    if provider in TRITON_PROVIDERS:
        return "tf32"  # the kernels round fp32 dot operands to tf32 (RNA) themselves, in the interpreter too
    if provider == "inf_cl":
        return "tf32_trunc"  # Inf-CL's forward tl.dot takes fp32 operands as they are: the tensor cores truncate
    if device_type != "cuda":
        return "fp32"  # CPU GEMMs multiply fp32 operands in fp32
    return "tf32" if precision == "high" else "bf16"  # cuBLAS under torch's "high" / "medium"


def model_errors(op: str, inputs, fmt: str, params: dict) -> dict | None:
    """Relative error of the loss value and of the gradients caused by rounding the GEMM operands to ``fmt``,
    from the float64 model (None without the model). knn: the fraction of neighbour indices that stay the same."""
    import torch.nn.functional as F

    from structure_ops import reference as R

    hw = hardware_model()
    if hw is None:
        return None
    if op == "structure":
        x, z = (t.detach().double() for t in inputs)
        xh, zh = R.prepare(x), R.prepare(z)
        tau = float(params.get("temperature", 0.05))
        exact = hw.level1_emulated(xh, zh, "fp64", temperature=tau)
        emu = hw.level1_emulated(xh, zh, fmt, temperature=tau)
        return {"value": hw.rel_err(emu[0], exact[0]), "grad": hw.rel_err(emu[2], exact[2])}
    if op == "clip":
        a, b, s = (t.detach().double() for t in inputs)

        def fn(an, bn):
            an, bn = an.clone().requires_grad_(True), bn.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = R.clip_loss(an, bn, s, normalize=False)
                ga, gb = torch.autograd.grad(loss, (an, bn))
            return loss.detach(), ga, gb

        errs = hw.emulated_error(fn, [F.normalize(a, dim=1), F.normalize(b, dim=1)], fmt, base="fp64")
        return {"value": errs[0], "grad": max(errs[1:])}
    if op == "knn":
        a = F.normalize(inputs[0].detach().double(), dim=1)
        k = H.resolve_k(params, a.shape[0])
        exact = R.knn(a, k)
        emu = R.knn(hw.round_operand(a, fmt), k)
        return {"index_agreement": float((exact == emu).double().mean())}
    return None


# ---------------------------------------------------------------------------------------------------
# providers
def chunked_structure_loss(x, z, temperature=0.05, chunk=4096):
    """R_S level 1 (cosine, structure divergence, ε = 1e-12) in row chunks: each chunk's rows of both
    softmaxes need only that chunk's similarity rows, and checkpointing recomputes them in backward, so
    autograd keeps O(chunk × N) instead of ~13–21 N × N matrices."""
    from torch.utils.checkpoint import checkpoint

    from structure_ops import reference as R

    xh, zh = R.prepare(x), R.prepare(z)
    n = xh.shape[0]

    def rows(xi, zi, xa, za):
        lx = torch.log_softmax(xi @ xa.T / temperature, dim=1)
        lz = torch.log_softmax(zi @ za.T / temperature, dim=1)
        p, q = lx.exp() + 1e-12, lz.exp() + 1e-12
        return (0.5 * 0.5 * (p + q) * torch.log1p((p - q) ** 2 / (4 * p * q))).sum()

    total = xh.new_zeros(())
    for s in range(0, n, chunk):
        total = total + checkpoint(rows, xh[s : s + chunk], zh[s : s + chunk], xh, zh, use_reentrant=False)
    return total / n


def _with_pass(mode: str, fn):
    """fn with STRUCTURE_OPS_TRITON_PASS=mode set during the call (the pass is chosen in the forward call)."""

    def call(*args):
        old = os.environ.get("STRUCTURE_OPS_TRITON_PASS")
        os.environ["STRUCTURE_OPS_TRITON_PASS"] = mode
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop("STRUCTURE_OPS_TRITON_PASS", None)
            else:
                os.environ["STRUCTURE_OPS_TRITON_PASS"] = old

    return call


def make_fn(op: str, provider: str, params: dict, n: int, compile_backend: str = "inductor"):
    import structure_ops as so

    if provider in ("reference", "compile_reference"):
        fn = H.make_fn(op, "reference", params, n)
        return torch.compile(fn, backend=compile_backend, dynamic=False) if provider == "compile_reference" else fn
    if provider == "chunked":
        if op != "structure" or int(params.get("levels", 1)) != 1:
            raise NotImplementedError("the chunked baseline covers structure level 1")
        return lambda x, z: chunked_structure_loss(x, z, float(params.get("temperature", 0.05)))
    if provider in ("triton_rows", "triton_flash", "triton", "cuda"):
        backend = "cuda" if provider == "cuda" else "triton"
        if provider in ("triton_rows", "triton_flash") and op != "structure":
            raise NotImplementedError("the pass choice applies to structure only")
        if op == "structure":
            kw = {"levels": int(params.get("levels", 1)), "temperature": float(params.get("temperature", 0.05))}
            fn = lambda x, z: so.structure_loss(x, z, backend=backend, **kw)  # noqa: E731
            return _with_pass(provider.split("_", 1)[1], fn) if provider.startswith("triton_") else fn
        if op == "clip":
            return lambda a, b, s: so.clip_loss(a, b, s, backend=backend)
        k = H.resolve_k(params, n)
        return lambda a: so.knn(a, k, backend=backend)
    if provider == "inf_cl":
        if op != "clip":
            raise NotImplementedError("inf_cl is a contrastive loss")
        from inf_cl import cal_inf_loss  # the peer, when installed

        def inf_cl(a, b, s):
            # Inf-CL computes one direction per call: both directions = two calls. Its own ``scale`` argument
            # all-reduces the scale's gradient (torch.distributed must be initialized), so the scale multiplies
            # the query side here instead: the same logits s·a bᵀ, and autograd gives the scale's gradient.
            import torch.nn.functional as F

            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            labels = torch.arange(a.shape[0], device=a.device)
            return 0.5 * (cal_inf_loss(s * a, b, labels=labels) + cal_inf_loss(s * b, a, labels=labels))

        return inf_cl
    raise ValueError(f"unknown provider {provider!r}")


def _inputs(op, n, dims, dtype, mode, device, seed=0):
    ins = H.make_inputs(op, n, dims, dtype, seed=seed, mode=mode)
    return [t.detach().to(device).requires_grad_(t.requires_grad) for t in ins]


def _value_and_grads(fn, inputs, mode):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    if mode == "fwd+bwd":
        out.backward()
    grads = [t.grad.detach().double() for t in inputs if getattr(t, "grad", None) is not None]
    return float(out.detach().double()) if out.dim() == 0 else None, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    num, den = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return num / den if den > 0 else num


def check(op, provider, params, dims, dtype, device, n=512, precision=None, seed=0, compile_backend="inductor") -> dict:
    """Relative errors of the value and of the gradients against the float64 oracle on the same inputs, the
    tolerance derived from the hardware model, and ``ok``."""
    precision = precision or torch.get_float32_matmul_precision()
    mode = "fwd" if op == "knn" else "fwd+bwd"
    ins = _inputs(op, n, dims, dtype, mode, device, seed)
    ref_ins = [t.detach().double().requires_grad_(t.requires_grad) for t in ins]
    fmt = operand_format(dtype, device.type, precision, provider)
    model = model_errors(op, ins, fmt, params)
    res: dict = {"N": n, "seed": seed, "operand_format": fmt, "model": model}
    if op == "knn":
        got = make_fn(op, provider, params, n)(*ins)
        want = H.make_fn(op, "reference", params, n)(*ref_ins)
        res["index_agreement"] = float((got.cpu() == want.cpu()).float().mean())
        if model is not None:
            res["min_agreement"] = max(0.0, model["index_agreement"] - 0.02)
            res["ok"] = res["index_agreement"] >= res["min_agreement"]
        return res
    v, g = _value_and_grads(make_fn(op, provider, params, n, compile_backend), ins, mode)
    rv, rg = _value_and_grads(H.make_fn(op, "reference", params, n), ref_ins, mode)
    res["rel_err"] = abs(v - rv) / max(abs(rv), 1e-300)
    res["grad_rel_err"] = max((_rel(a, b) for a, b in zip(g, rg, strict=True)), default=0.0)
    if model is not None:
        hw = hardware_model()
        res["tol"] = hw.tolerance(model["value"], SAFETY, VALUE_FLOOR)
        res["grad_tol"] = hw.tolerance(model["grad"], SAFETY, GRAD_FLOOR)
        finite = math.isfinite(v) and all(bool(torch.isfinite(t).all()) for t in g)
        res["ok"] = bool(finite and res["rel_err"] <= res["tol"] and res["grad_rel_err"] <= res["grad_tol"])
    return res


# ---------------------------------------------------------------------------------------------------
# timing and memory
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, inputs, mode, device, *, target_s=1.0, max_reps=20, min_reps=2) -> dict:
    """First call (compilation; peak memory beyond inputs and outputs on CUDA), then repeats: ``min_reps``
    up to ``max_reps``, as many as fill ``target_s``; wall clock around a device synchronize, median."""
    step = H.make_step(fn, inputs, mode)
    leaves = [t for t in inputs if getattr(t, "requires_grad", False)]
    for t in leaves:
        t.grad = None
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = step()
    _sync(device)
    res: dict = {"first_call_s": time.perf_counter() - t0}
    if cuda:
        out_bytes = out.numel() * out.element_size() + sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None)
        res["peak_extra_bytes"] = int(torch.cuda.max_memory_allocated(device) - base - out_bytes)
    del out
    samples = []
    while len(samples) < max_reps:
        t0 = time.perf_counter()
        step()
        _sync(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= min_reps and sum(samples) >= target_s:
            break
    res["median_s"] = statistics.median(samples)
    res["samples_s"] = samples
    return res


def matmul_rate(n: int, device, dtype=torch.bfloat16, reps: int = 10) -> dict:
    """FLOP/s of an n³ torch.matmul on random data (3 warm-ups, median of ``reps``)."""
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        samples.append(time.perf_counter() - t0)
    med = statistics.median(samples)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_s": med, "flops_per_s": 2.0 * n**3 / med}


def environment(device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({H.cpu_model()})",
           "matmul_precision": torch.get_float32_matmul_precision(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    env["git"], env["dirty"] = H.git_info()
    return env


def _write(path, payload):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# the targets (benchmarks/gpu_run.sh stage 4)
FULL_SIZES = {"n_main": 16384, "n_max": (65536, 262144), "n_gemm": 65536, "n_clip": 65536, "matmul": 8192,
              "d_x": 1024, "d_z": 512, "d": 512, "check_n": 512}
SMOKE_SIZES = {"n_main": 64, "n_max": (96, 128), "n_gemm": 96, "n_clip": 96, "matmul": 64,
               "d_x": 32, "d_z": 16, "d": 16, "check_n": 48}
OURS_STRUCTURE = ("cuda", "triton_rows", "triton_flash")
COMPILE_ALLOWANCE_S = 45.0  # inductor's cold compilation of the reference's forward and backward (16 cores)
OURS_CLIP = ("cuda", "triton")


class Targets:
    """Fills targets.json / bench.json as it goes, inside a time budget."""

    def __init__(self, out: str, smoke: bool, budget_s: float, compile_backend: str, seed: int):
        self.out, self.smoke, self.compile_backend, self.seed = out, smoke, compile_backend, seed
        self.deadline = time.monotonic() + budget_s
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sizes = SMOKE_SIZES if smoke else FULL_SIZES
        self.params = {"levels": 1, "temperature": 0.05}
        device_name = environment(self.device)["device"]
        if smoke:
            device_name = f"SMOKE (not a measurement of the targets: tiny sizes, {device_name})"
        self.targets = {k: None for k in TARGET_KEYS}
        self.targets["device"] = device_name
        self.bench = {"mode": "smoke" if smoke else "full", "environment": environment(self.device),
                      "sizes": self.sizes, "budget_s": budget_s, "seed": seed, "safety": SAFETY,
                      "floors": {"value": VALUE_FLOOR, "grad": GRAD_FLOOR}, "checks": [], "records": [],
                      "targets": {}, "notes": {}}
        self.write()

    # -- bookkeeping
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self):
        _write(os.path.join(self.out, "targets.json"), self.targets)
        _write(os.path.join(self.out, "bench.json"), self.bench)

    def note(self, key: str, why: str):
        self.bench["notes"][key] = why
        print(f"[targets] {key}: {why}", flush=True)
        self.write()

    def set(self, key: str, value: float, how: dict):
        self.targets[key] = value
        self.bench["targets"][key] = {"value": value, **how}
        print(f"[targets] {key} = {value}", flush=True)
        self.write()

    # -- measurements
    def check(self, op, provider, dtype, dims) -> dict:
        rec = {"op": op, "provider": provider, "dtype": dtype}
        try:
            rec.update(check(op, provider, self.params, dims, dtype, self.device, n=self.sizes["check_n"],
                             seed=self.seed, compile_backend=self.compile_backend))
        except Exception as e:  # noqa: BLE001 - a provider that cannot run here is recorded, not fatal
            rec["skipped"] = f"{type(e).__name__}: {str(e)[:800]}"
        self.bench["checks"].append(rec)
        self.write()
        print(f"[check] {op} {dtype} {provider}: " + (rec.get("skipped") or
              f"rel_err={rec.get('rel_err', rec.get('index_agreement'))} grad_rel_err={rec.get('grad_rel_err')} "
              f"tol={rec.get('tol')} grad_tol={rec.get('grad_tol')} ok={rec.get('ok')}"), flush=True)
        return rec

    def point(self, op, provider, dtype, n, dims, *, predicted_s=None, reps=None, prepare_s=0.0) -> dict:
        """One timed point; skipped (with the reason) when the budget cannot hold ``prepare_s`` (compilation) and
        ~3 calls of ``predicted_s``."""
        rec = {"op": op, "provider": provider, "dtype": dtype, "mode": "fwd+bwd", "N": n, "dims": dims}
        if predicted_s is not None and prepare_s + 3 * predicted_s > self.left():
            rec["skipped"] = (f"predicted {predicted_s:.2f} s per call after {prepare_s:.0f} s of preparation; "
                              f"{self.left():.0f} s of the budget left")
        elif self.left() <= 0:
            rec["skipped"] = "out of the time budget"
        else:
            try:
                fn = make_fn(op, provider, self.params, n, self.compile_backend)
                inputs = _inputs(op, n, dims, dtype, "fwd+bwd", self.device, self.seed)
                target_s = 0.0 if self.smoke else min(1.0, max(0.0, self.left() / 20))
                rec.update(measure(fn, inputs, "fwd+bwd", self.device, target_s=target_s,
                                   max_reps=reps or (1 if self.smoke else 20), min_reps=1 if self.smoke else 2))
                flops = H.OPS[op].flops(n, dims, "fwd+bwd", self.params)
                rec["model_flops"] = flops
                rec["tflops"] = flops / rec["median_s"] / 1e12
                roofline.annotate(rec, _ceilings(self.device), op=op, dims=dims, params=self.params,
                                  precision=torch.get_float32_matmul_precision())
                del fn, inputs
            except torch.cuda.OutOfMemoryError as e:
                rec["oom"] = str(e)[:300]
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.bench["records"].append(rec)
        self.write()
        _print(op, rec)
        return rec

    # -- the targets, cheapest first; torch.compile (the slowest to prepare) last
    def run(self):
        s = self.sizes
        sdims = {"d_x": s["d_x"], "d_z": s["d_z"]}
        cdims = {"d": s["d"]}
        mm = None
        try:
            mm = matmul_rate(s["matmul"], self.device)
            self.bench["matmul_bf16"] = mm
            self.write()
        except Exception as e:  # noqa: BLE001
            self.note("gemm_fraction_of_bf16_peak", f"bf16 matmul failed: {type(e).__name__}: {e}")

        # 1. structure level 1, fp32 at the set precision: ours, then the eager reference
        ours = [p for p in OURS_STRUCTURE if self._ok(self.check("structure", p, "float32", sdims))]
        timed = [self.point("structure", p, "float32", s["n_main"], sdims) for p in ours]
        timed = sorted((r for r in timed if "median_s" in r), key=lambda r: r["median_s"])
        best = timed[0] if timed else None
        if best is None:
            self.note("structure_l1_n16384_speedup_vs_eager", f"none of our backends ran and passed the check ({', '.join(OURS_STRUCTURE)})")
        ref = self.point("structure", "reference", "float32", s["n_main"], sdims)
        if best and "median_s" in ref:
            self.set("structure_l1_n16384_speedup_vs_eager", ref["median_s"] / best["median_s"],
                     {"ours": best["provider"], "ours_s": best["median_s"], "baseline_s": ref["median_s"], "N": s["n_main"]})
        elif best:
            self.note("structure_l1_n16384_speedup_vs_eager", f"the eager reference did not run: {_why(ref)}")

        # 2. the largest N of ours (fastest first), with its peak memory beyond inputs and outputs: the first size
        # now, the larger ones last (predicted from the measured ones, skipped when they cannot fit the budget)
        order = [r["provider"] for r in timed]
        self._last = {r["provider"]: r for r in timed}
        self._max_n(order, s["n_max"][:1], sdims)

        # 3. bf16 level 1: GEMM FLOPs (the FLOP model) per second / the bf16 matmul's FLOP/s
        ours16 = [p for p in OURS_STRUCTURE if self._ok(self.check("structure", p, "bfloat16", sdims))]
        recs = [self.point("structure", p, "bfloat16", s["n_gemm"], sdims) for p in ours16]
        recs = sorted((r for r in recs if "median_s" in r), key=lambda r: r["median_s"])
        if recs and mm:
            r = recs[0]
            rate = r["model_flops"] / r["median_s"]
            self.set("gemm_fraction_of_bf16_peak", rate / mm["flops_per_s"],
                     {"provider": r["provider"], "N": s["n_gemm"], "model_flops_per_s": rate, "matmul_flops_per_s": mm["flops_per_s"]})
        elif not recs:
            self.note("gemm_fraction_of_bf16_peak", "none of our backends ran and passed the bf16 check")

        # 4. clip fwd+bwd vs Inf-CL
        self._clip(cdims)

        # 5. torch.compile(reference): compiled at the measured shape (the compilation is the first call)
        if best is not None:
            comp = self.point("structure", "compile_reference", "float32", s["n_main"], sdims,
                              predicted_s=ref.get("median_s", 0.0), prepare_s=0.0 if self.smoke else COMPILE_ALLOWANCE_S)
            if "median_s" in comp:
                self.set("structure_l1_n16384_speedup_vs_compile", comp["median_s"] / best["median_s"],
                         {"ours": best["provider"], "ours_s": best["median_s"], "baseline_s": comp["median_s"],
                          "compile_backend": self.compile_backend, "compile_and_first_call_s": comp["first_call_s"]})
            else:
                self.note("structure_l1_n16384_speedup_vs_compile", f"torch.compile(reference) did not run: {_why(comp)}")
        else:
            self.note("structure_l1_n16384_speedup_vs_compile", "none of our backends ran and passed the check")

        # 6. the larger N of ours
        self._max_n(order, s["n_max"][1:], sdims)
        if self.targets["structure_l1_max_n"] is None:
            self.note("structure_l1_max_n", f"none of {list(s['n_max'])} ran with {order or 'any of our backends'}")
        return self.targets

    def _max_n(self, order, ns, sdims):
        for n in ns:
            for p in order:
                prev = self._last[p]
                predicted = prev["median_s"] * (n / prev["N"]) ** 2
                rec = self.point("structure", p, "float32", n, sdims, predicted_s=predicted, reps=2)
                if "median_s" in rec:
                    self._last[p] = rec
                    self.set("structure_l1_max_n", n, {"provider": p, "median_s": rec["median_s"]})
                    peak = rec.get("peak_extra_bytes")
                    if peak is not None:
                        self.set("structure_l1_max_n_peak_extra_gib", peak / 2**30, {"provider": p, "N": n})
                    else:
                        self.note("structure_l1_max_n_peak_extra_gib", "no device memory statistics on a CPU")
                    break

    def _clip(self, cdims):
        s = self.sizes
        key = "clip_n65536_speedup_vs_infcl"
        if importlib.util.find_spec("inf_cl") is None:
            self.note(key, "the inf_cl package is not installed (benchmarks/gpu_run.sh installs benchmarks/wheels/inf_cl-*.whl)")
            return
        if self.device.type != "cuda":
            self.note(key, "Inf-CL needs a CUDA GPU (its kernels use inline PTX, which Triton's interpreter cannot run)")
            return
        peer = self.check("clip", "inf_cl", "float32", cdims)
        if "skipped" in peer:
            self.note(key, f"inf_cl did not run: {peer['skipped']}")
            return
        ours = [p for p in OURS_CLIP if self._ok(self.check("clip", p, "float32", cdims))]
        recs = [self.point("clip", p, "float32", s["n_clip"], cdims) for p in ours]
        recs = sorted((r for r in recs if "median_s" in r), key=lambda r: r["median_s"])
        if not recs:
            self.note(key, "none of our clip backends ran and passed the check")
            return
        peer_rec = self.point("clip", "inf_cl", "float32", s["n_clip"], cdims)
        if "median_s" not in peer_rec:
            self.note(key, f"inf_cl did not run at N={s['n_clip']}: {_why(peer_rec)}")
            return
        self.set(key, peer_rec["median_s"] / recs[0]["median_s"],
                 {"ours": recs[0]["provider"], "ours_s": recs[0]["median_s"], "inf_cl_s": peer_rec["median_s"],
                  "inf_cl_check_ok": peer.get("ok")})

    @staticmethod
    def _ok(rec: dict) -> bool:
        """A provider counts when it ran and did not fail its check (ok None: no hardware model to judge)."""
        return "skipped" not in rec and rec.get("ok") is not False


def _why(rec: dict) -> str:
    return rec.get("skipped") or rec.get("error") or ("out of memory" if rec.get("oom") else "unknown")


# ---------------------------------------------------------------------------------------------------
# full sweeps
SWEEPS = {  # op: (dims, default N list, modes)
    "structure": ({"d_x": 1024, "d_z": 512}, [4096, 8192, 16384, 32768, 65536, 131072, 262144], ("fwd", "fwd+bwd")),
    "clip": ({"d": 512}, [4096, 16384, 65536, 131072, 262144], ("fwd", "fwd+bwd")),
    "knn": ({"d": 1024}, [4096, 16384, 65536], ("fwd",)),
}


def _ceilings(device: torch.device):
    """The device's stored roofline ceilings (None on a CPU or an unknown GPU: records then carry the
    model terms but no bound)."""
    return roofline.ceilings_for_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def run(op: str, out: str, ns, dtypes, providers, smoke: bool, seed: int = 0) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims, default_ns, modes = SWEEPS[op]
    if smoke:
        dims = {k: 16 for k in dims}
    ns = ns or default_ns
    params = {"levels": 1, "temperature": 0.05}
    path = os.path.join(out, f"gpu_{op}.json")
    payload = {"op": op, "environment": environment(device), "dims": dims, "seed": seed, "checks": [], "records": []}
    for dtype in dtypes:
        for provider in providers:
            try:
                payload["checks"].append({"provider": provider, "dtype": dtype,
                                          **check(op, provider, params, dims, dtype, device, n=64 if smoke else 512, seed=seed)})
            except Exception as e:  # a provider that cannot run here
                payload["checks"].append({"provider": provider, "dtype": dtype, "skipped": f"{type(e).__name__}: {e}"})
        runnable = [c["provider"] for c in payload["checks"] if c["dtype"] == dtype and "skipped" not in c]
        for mode in modes:
            dead = set()
            for n in ns:
                for provider in runnable:
                    rec = {"provider": provider, "dtype": dtype, "mode": mode, "N": n}
                    if provider in dead:
                        rec["skipped"] = "a smaller N ran out of memory"
                    else:
                        try:
                            fn = make_fn(op, provider, params, n)
                            inputs = _inputs(op, n, dims, dtype, mode, device, seed)
                            m = measure(fn, inputs, mode, device, target_s=0.0 if smoke else 0.5,
                                        max_reps=1 if smoke else 20, min_reps=1 if smoke else 3)
                            flops = H.OPS[op].flops(n, dims, mode, params)
                            rec.update(median_s=m["median_s"], peak_bytes=m.get("peak_extra_bytes"),
                                       tflops=flops / m["median_s"] / 1e12 if flops else None)
                            roofline.annotate(rec, _ceilings(device), op=op, dims=dims, params=params,
                                              precision=torch.get_float32_matmul_precision())
                        except torch.cuda.OutOfMemoryError:
                            rec["oom"] = True
                            dead.add(provider)
                        except Exception as e:
                            rec["error"] = f"{type(e).__name__}: {e}"
                        finally:
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                    payload["records"].append(rec)
                    _write(path, payload)
                    _print(op, rec)
    return path


def _print(op, r):
    if "median_s" in r:
        peak = r.get("peak_bytes", r.get("peak_extra_bytes"))
        peak = f"{peak / 2**20:9.0f} MiB" if peak is not None else "        -    "
        tf = f"{r['tflops']:7.1f} TFLOP/s" if r.get("tflops") else ""
        print(f"{op:9s} {r['dtype']:9s} {r['mode']:8s} N={r['N']:<7d} {r['provider']:18s} {r['median_s'] * 1e3:10.2f} ms {peak} {tf}", flush=True)
    else:
        print(f"{op:9s} {r['dtype']:9s} {r['mode']:8s} N={r['N']:<7d} {r['provider']:18s} "
              f"{'OOM' if r.get('oom') else r.get('skipped') or r.get('error')}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--targets", action="store_true", help="measure the targets (targets.json, bench.json) instead of sweeping")
    p.add_argument("--budget-s", type=float, default=150.0, help="time budget of --targets (seconds)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend of compile_reference (default inductor; aot_eager with --smoke)")
    p.add_argument("--ops", default="structure,clip,knn")
    p.add_argument("--n", type=H.int_list, help="N values (default: the op's sweep)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--precision", default="high", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for fp32 (default high: TF32)")
    p.add_argument("--seed", type=int, default=None, help="input seed (default: fresh, from the clock; recorded)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; on a CPU the Triton kernels run in the interpreter")
    a = p.parse_args(argv)
    torch.set_float32_matmul_precision(a.precision)
    os.makedirs(a.out, exist_ok=True)
    seed = a.seed if a.seed is not None else int(time.time()) % 2**31
    if a.targets:
        backend = a.compile_backend or ("aot_eager" if a.smoke else "inductor")
        t = Targets(a.out, a.smoke, a.budget_s, backend, seed).run()
        print(json.dumps(t, indent=1))
        _write_autotune(a.out)
        return 0
    ns = a.n or ([32, 48] if a.smoke else None)
    for op in a.ops.split(","):
        print(f"wrote {run(op, a.out, ns, a.dtypes.split(','), a.providers.split(','), a.smoke, seed)}")
    _write_autotune(a.out)
    return 0


def _write_autotune(out: str) -> None:
    """autotune.json: every Triton autotune choice of this run (per space and key: the configuration, whether it was
    benchmarked, the per-candidate times; docs/kernels.md §11)."""
    try:
        from structure_ops._triton._common import autotune_cache
    except ImportError:  # no triton
        return
    path = os.path.join(out, "autotune.json")
    _write(path, autotune_cache())
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
