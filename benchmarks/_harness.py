"""Shared benchmark harness for structure-ops (CPU).

Providers
    reference          eager ``structure_ops.reference.*`` (the package's own oracle: the baseline)
    compile_reference  ``torch.compile(reference fn)`` with inductor; aot_eager if inductor fails (recorded)
    cpu                ``structure_ops.*(..., backend="cpu")`` (the C++ kernels)

Modes
    fwd       inputs do not require grad (the cpu backend then skips its gradient work)
    fwd+bwd   loss.backward(): grad w.r.t. z (structure; x is the frozen side), w.r.t. image, text and
              logit_scale (clip). kNN ops have no backward.

Every (op, provider, mode, N, dims) point runs in a fresh subprocess (``python _harness.py --worker SPEC``):
  1. build the inputs (fixed seed, structured: z = x W / sqrt(d_x) + 0.5 noise);
  2. warm up: eager providers on a tiny N (threads, oneDNN, autograd engine); compile_reference at full
     size (compilation needs the real shape), then gc + malloc_trim(0) to hand freed memory back;
  3. reset the peak RSS (write "5" to /proc/self/clear_refs; if that fails the fresh process is the
     reset), read VmRSS, run the op once, read VmHWM: peak_extra = VmHWM - VmRSS_before;
  4. time: optional warm-up calls, then repeats (adapted to the call time); median, p20, p80.
The parent collects one record per point, skips (with a recorded reason) points whose predicted time
or memory is too large, and writes ``<out>/<op>.json`` atomically after every point.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "cpu")
RESULT_MARK = "@@BENCH_RESULT@@ "
PROVIDERS = ("reference", "compile_reference", "cpu")
MODES = ("fwd", "fwd+bwd")
SCHEMA = 1


# ---------------------------------------------------------------------------------------------------
# Ops: inputs, provider callables, FLOP models. Imported by the parent (no torch needed for the
# FLOP models) and by the workers / pytest-benchmark tests (torch needed).
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpDef:
    name: str
    dim_names: tuple[str, ...]
    modes: tuple[str, ...]
    flops: Callable[[int, dict, str, dict], float | None]
    # rough peak extra memory in units of N*N elements of the input dtype, per (provider, mode); used
    # only to skip points that cannot fit before any measurement exists at a smaller N
    nn_factor: dict = field(default_factory=dict)


def _structure_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    """KERNELS.md §2(a): fwd 2N²(d_x+d_z); fwd+bwd (gradient in forward) 2N²(d_x+3d_z).
    Levels L > 1 add the power products: 2 sides × (L−1) × 2N³ forward, 2 adjoint products × (L−1) × 2N³
    backward (z side only)."""
    dx, dz, levels = dims["d_x"], dims["d_z"], int(params.get("levels", 1))
    if mode == "fwd":
        return 2.0 * n * n * (dx + dz) + 4.0 * (levels - 1) * n**3
    return 2.0 * n * n * (dx + 3 * dz) + 8.0 * (levels - 1) * n**3


def _clip_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    """KERNELS.md §4: fwd 2N²d; fwd+bwd 8N²d (one forward pass + one recomputing backward pass)."""
    return (2.0 if mode == "fwd" else 8.0) * n * n * dims["d"]


def _knn_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    """2N²d per side (the Gram panels); the selection is not counted."""
    return 2.0 * n * n * dims["d"]


def _mutual_knn_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    return 4.0 * n * n * dims["d"]


OPS: dict[str, OpDef] = {
    "structure": OpDef(
        "structure", ("d_x", "d_z"), MODES, _structure_flops,
        {("reference", "fwd"): 8, ("reference", "fwd+bwd"): 12, ("compile_reference", "fwd"): 8,
         ("compile_reference", "fwd+bwd"): 12, ("cpu", "fwd"): 2, ("cpu", "fwd+bwd"): 4},
    ),
    "clip": OpDef(
        "clip", ("d",), MODES, _clip_flops,
        {("reference", "fwd"): 4, ("reference", "fwd+bwd"): 8, ("compile_reference", "fwd"): 4,
         ("compile_reference", "fwd+bwd"): 8, ("cpu", "fwd"): 1, ("cpu", "fwd+bwd"): 1},
    ),
    "knn": OpDef(
        "knn", ("d",), ("fwd",), _knn_flops,
        {("reference", "fwd"): 6, ("compile_reference", "fwd"): 6, ("cpu", "fwd"): 1},
    ),
    "mutual_knn": OpDef(
        "mutual_knn", ("d",), ("fwd",), _mutual_knn_flops,
        {("reference", "fwd"): 8, ("compile_reference", "fwd"): 8, ("cpu", "fwd"): 1},
    ),
}


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]  # fmt: skip


def make_inputs(op: str, n: int, dims: dict, dtype: str = "float32", seed: int = 0, mode: str = "fwd") -> list:
    """Structured (not isotropic) inputs with a fixed seed: the second view is a random linear map of
    the first plus noise, so both neighbourhood structures are correlated, as in real paired features."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    grad = mode == "fwd+bwd"
    if op == "structure":
        dx, dz = dims["d_x"], dims["d_z"]
        x = torch.randn(n, dx, generator=g)
        w = torch.randn(dx, dz, generator=g) / math.sqrt(dx)
        z = x @ w + 0.5 * torch.randn(n, dz, generator=g)
        return [x.to(dt), z.to(dt).requires_grad_(grad)]
    d = dims["d"]
    a = torch.randn(n, d, generator=g)
    w = torch.randn(d, d, generator=g) / math.sqrt(d)
    b = a @ w + 0.5 * torch.randn(n, d, generator=g)
    if op == "clip":
        scale = torch.tensor(1.0 / 0.07)  # open_clip's initial logit_scale.exp()
        return [a.to(dt).requires_grad_(grad), b.to(dt).requires_grad_(grad), scale.to(dt).requires_grad_(grad)]
    if op == "knn":
        return [a.to(dt)]
    if op == "mutual_knn":
        return [a.to(dt), b.to(dt)]
    raise ValueError(f"unknown op {op!r}")


def resolve_k(params: dict, n: int) -> int:
    from structure_ops._options import resolve_k as _rk

    return _rk(params.get("k", "rice"), n)


def make_fn(op: str, provider: str, params: dict, n: int, compile_backend: str = "inductor") -> Callable:
    """The callable timed for (op, provider): takes the inputs of :func:`make_inputs`, returns the output."""
    import torch
    import torch.nn.functional as F

    import structure_ops as so
    from structure_ops import reference as R

    if op == "structure":
        kw = {"levels": int(params.get("levels", 1)), "temperature": float(params.get("temperature", 0.05))}

        def ref(x, z):
            return R.structure_loss(x, z, **kw)

        def cpu(x, z):
            return so.structure_loss(x, z, backend="cpu", **kw)
    elif op == "clip":

        def ref(image, text, scale):
            return R.clip_loss(image, text, scale)

        def cpu(image, text, scale):
            return so.clip_loss(image, text, scale, backend="cpu")
    elif op == "knn":
        k = resolve_k(params, n)

        def ref(a):  # structure_ops.knn(a, k) is documented as reference.knn(F.normalize(a), k)
            return R.knn(F.normalize(a, dim=1, eps=1e-12), k)

        def cpu(a):
            return so.knn(a, k, backend="cpu")
    elif op == "mutual_knn":
        k = resolve_k(params, n)

        def ref(a, b):
            return R.mutual_knn(a, b, k)

        def cpu(a, b):
            return so.mutual_knn(a, b, k, backend="cpu")
    else:
        raise ValueError(f"unknown op {op!r}")
    if provider == "reference":
        return ref
    if provider == "cpu":
        return cpu
    if provider == "compile_reference":
        return torch.compile(ref, backend=compile_backend, dynamic=False)
    raise ValueError(f"unknown provider {provider!r}")


def make_step(fn: Callable, inputs: Sequence, mode: str) -> Callable[[], object]:
    """One timed call: forward (fwd) or forward + backward (fwd+bwd), gradients reset before."""
    leaves = [t for t in inputs if getattr(t, "requires_grad", False)]
    if mode == "fwd":
        return lambda: fn(*inputs)
    if not leaves:
        raise ValueError("fwd+bwd needs inputs that require grad")

    def step():
        for t in leaves:
            t.grad = None
        loss = fn(*inputs)
        loss.backward()
        return loss

    return step


def scalar_value(out) -> float | None:
    """A scalar summary of an output for cross-provider sanity checks (loss, score, index checksum)."""
    import torch

    if not isinstance(out, torch.Tensor):
        return None
    if out.dim() == 0:
        return float(out.detach())
    return float(out.to(torch.float64).sum())


# ---------------------------------------------------------------------------------------------------
# Process memory (Linux /proc)
# ---------------------------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: echo 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kb("VmHWM"), _proc_status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------
# Worker: one measurement point in this (fresh) process
# ---------------------------------------------------------------------------------------------------
def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def choose_repeats(call_s: float, max_repeats: int, target_s: float) -> int:
    """Repeats for a point whose call takes ``call_s``: fill ``target_s``, at least 5 for fast calls,
    3 up to 10 s, 2 up to 30 s and 1 beyond (the memory call has already warmed everything up)."""
    floor = 5 if call_s < 1 else 3 if call_s < 10 else 2 if call_s < 30 else 1
    return max(1, min(max_repeats, max(floor, int(target_s // max(call_s, 1e-9)))))


def run_point(spec: dict) -> dict:
    """Measure one point (see the module docstring). Returns a dict of measurements."""
    import torch

    op, provider, mode, n = spec["op"], spec["provider"], spec["mode"], int(spec["N"])
    dims, params, dtype = spec["dims"], spec.get("params", {}), spec.get("dtype", "float32")
    measure_memory = spec.get("measure_memory", True)
    res: dict = {"threads": torch.get_num_threads()}

    inputs = make_inputs(op, n, dims, dtype, spec.get("seed", 0), mode)
    compile_backend = None
    if provider == "compile_reference":
        compile_backend = spec.get("compile_backend", "inductor")
        fn = make_fn(op, provider, params, n, compile_backend)
        step = make_step(fn, inputs, mode)
        t0 = time.perf_counter()
        try:
            step()
        except Exception as exc:  # inductor needs a working C++ toolchain; fall back and say so
            if compile_backend != "inductor":
                raise
            res["compile_fallback_reason"] = f"inductor failed: {type(exc).__name__}: {str(exc)[:500]}"
            torch._dynamo.reset()
            compile_backend = "aot_eager"
            fn = make_fn(op, provider, params, n, compile_backend)
            step = make_step(fn, inputs, mode)
            t0 = time.perf_counter()
            step()
        res["compile_and_first_call_s"] = time.perf_counter() - t0
        res["compile_backend"] = compile_backend
        res["mem_warmup"] = "full-size call (compilation) + gc + malloc_trim"
    else:
        fn = make_fn(op, provider, params, n)
        step = make_step(fn, inputs, mode)
        tiny_n = min(64, n)
        tiny = make_inputs(op, tiny_n, dims, dtype, 1, mode)
        tiny_fn = make_fn(op, provider, params, tiny_n)
        for _ in range(2):
            make_step(tiny_fn, tiny, mode)()
        del tiny, tiny_fn
        res["mem_warmup"] = f"tiny call (N={tiny_n})"
    release_free_memory()

    # --- peak extra memory of one call ---
    res["hwm_reset"] = reset_peak_rss() if measure_memory else None
    rss0 = _proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    out = step()
    first = time.perf_counter() - t0
    hwm = _proc_status_kb("VmHWM")
    res["first_call_s"] = first
    res["value"] = scalar_value(out)
    del out
    if measure_memory and rss0 is not None and hwm is not None:
        res["rss_before_mb"] = rss0 / 1024
        res["hwm_mb"] = hwm / 1024
        res["peak_extra_mb"] = (hwm - rss0) / 1024
    else:
        res["peak_extra_mb"] = None

    # --- timing ---
    max_repeats = int(spec.get("repeats", 10))
    reps = choose_repeats(first, max_repeats, float(spec.get("target_s", 10.0)))
    warmup = int(spec.get("warmup", 1 if first < 5 else 0))
    for _ in range(warmup):
        step()
    samples = []
    gc.collect()
    for _ in range(reps):
        t0 = time.perf_counter()
        out = step()
        samples.append(time.perf_counter() - t0)
        del out
    xs = sorted(samples)
    res.update(
        median_s=_percentile(xs, 0.5), p20_s=_percentile(xs, 0.2), p80_s=_percentile(xs, 0.8),
        min_s=xs[0], n_repeats=reps, n_warmup=warmup + 1, samples_s=samples,
    )  # fmt: skip
    return res


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        res = run_point(spec)
    except Exception as exc:  # reported to the parent as a recorded error
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------------
# Environment metadata
# ---------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info() -> tuple[str | None, bool | None]:
    try:
        sha = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if sha.returncode != 0:
            return None, None
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment() -> dict:
    import torch

    sha, dirty = git_info()
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "device": {
            "type": "cpu",
            "name": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "mem_total_gib": round(mem_total / 2**30, 1) if mem_total else None,
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
        "git_dirty": dirty,
    }


# ---------------------------------------------------------------------------------------------------
# Parent: the sweep
# ---------------------------------------------------------------------------------------------------
def record_key(r: dict) -> tuple:
    return (r["op"], r["provider"], r["mode"], r["N"], tuple(sorted(r["dims"].items())), r["dtype"],
            tuple(sorted(r.get("params", {}).items())))  # fmt: skip


def _base_key(r: dict) -> tuple:
    k = record_key(r)
    return k[:1] + k[2:]


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_<p> = median(p) / median(this) for the same op/mode/N/dims/dtype/params."""
    by = {}
    for r in records:
        if r.get("median_s"):
            by[(r["provider"],) + _base_key(r)] = r["median_s"]
    for r in records:
        for p in ("reference", "compile_reference"):
            other = by.get((p,) + _base_key(r))
            r[f"speedup_vs_{p}"] = (other / r["median_s"]) if (other and r.get("median_s")) else None


def write_json_atomic(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_records(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return list(json.load(f).get("records", []))
    except (OSError, ValueError):
        return []


def _run_worker(spec: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
            if "error" in res:
                res["stderr_tail"] = proc.stderr[-3000:]
            return res
    why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    hint = " (SIGKILL: probably out of memory)" if proc.returncode == -9 else ""
    return {"error": f"worker died with {why}{hint}", "stderr_tail": proc.stderr[-3000:]}


@dataclass
class SweepConfig:
    op: str
    sizes: list[int]
    dims_list: list[dict]
    modes: list[str]
    providers: list[str]
    out_dir: str
    dtype: str = "float32"
    params: dict = field(default_factory=dict)
    repeats: int = 10
    target_s: float = 10.0
    max_call_s: float = 60.0
    mem_fraction: float = 0.8
    worker_timeout_s: float = 1800.0
    seed: int = 0
    fresh: bool = False
    verbose: bool = True


def _log(cfg: SweepConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, flush=True)


def _time_exponent(op: str, params: dict) -> float:
    if op == "structure" and int(params.get("levels", 1)) > 1:
        return 3.0
    return 2.0


def sweep(cfg: SweepConfig) -> str:
    """Run every point of ``cfg`` (each in a fresh subprocess) and write ``<out_dir>/<op>.json``."""
    opdef = OPS[cfg.op]
    env = environment()
    path = os.path.join(cfg.out_dir, f"{cfg.op}.json")
    records = [] if cfg.fresh else load_records(path)
    index = {record_key(r): i for i, r in enumerate(records)}
    elem = _dtype(cfg.dtype).itemsize
    t_start = time.perf_counter()
    _log(cfg, f"[{cfg.op}] {env['device']['name']} ({env['device']['cores']} cores, torch {env['torch']}, "
              f"{env['device']['torch_threads']} threads) -> {path}")  # fmt: skip

    def save():
        add_speedups(records)
        payload = {"schema": SCHEMA, "op": cfg.op, "updated": _now(), "environment": env, "records": records}
        write_json_atomic(path, payload)

    for dims in cfg.dims_list:
        for mode in cfg.modes:
            if mode not in opdef.modes:
                _log(cfg, f"[{cfg.op}] mode {mode!r} does not apply (ops modes: {opdef.modes}); skipped")
                continue
            for provider in cfg.providers:
                hist_t: tuple[int, float] | None = None  # (N, seconds per call), measured or predicted
                hist_m: tuple[int, float] | None = None  # (N, peak extra bytes), measured
                for n in sorted(cfg.sizes):
                    flops = opdef.flops(n, dims, mode, cfg.params)
                    rec = {
                        "op": cfg.op, "provider": provider, "mode": mode, "N": n, "dims": dict(dims),
                        "dtype": cfg.dtype, "params": dict(cfg.params), "flops": flops,
                    }  # fmt: skip
                    # ---- predictions: skip what cannot run, with the reason recorded ----
                    pred_t = hist_t[1] * (n / hist_t[0]) ** _time_exponent(cfg.op, cfg.params) if hist_t else None
                    if hist_m and hist_m[0] >= 512:
                        pred_m = hist_m[1] * (n / hist_m[0]) ** 2
                        m_how = f"scaled (N/{hist_m[0]})^2 from the measured {hist_m[1] / 2**20:.0f} MB"
                    else:
                        pred_m = opdef.nn_factor.get((provider, mode), 4) * n * n * elem
                        m_how = f"~{opdef.nn_factor.get((provider, mode), 4)} N x N {cfg.dtype} matrices"
                    avail = mem_available_bytes()
                    reason = None
                    if avail is not None and pred_m > cfg.mem_fraction * avail:
                        reason = (f"predicted peak extra memory {pred_m / 2**30:.1f} GiB ({m_how}) > "
                                  f"{cfg.mem_fraction:.0%} of available {avail / 2**30:.1f} GiB")  # fmt: skip
                    elif pred_t is not None and pred_t > cfg.max_call_s:
                        reason = (f"predicted {pred_t:.0f} s per call (scaled from N={hist_t[0]}) > "
                                  f"limit {cfg.max_call_s:.0f} s")  # fmt: skip
                    if reason:
                        rec.update(skipped=True, skip_reason=reason, median_s=None, p20_s=None, p80_s=None,
                                   peak_extra_mb=None, gflops=None)  # fmt: skip
                        if pred_t is not None:
                            hist_t = (n, pred_t)
                        _log(cfg, f"  skip {provider:17s} {mode:7s} N={n:6d} {_dims_str(dims)}: {reason}")
                    else:
                        spec = {
                            "op": cfg.op, "provider": provider, "mode": mode, "N": n, "dims": dims,
                            "dtype": cfg.dtype, "params": cfg.params, "seed": cfg.seed,
                            "repeats": cfg.repeats, "target_s": cfg.target_s,
                        }  # fmt: skip
                        timeout = cfg.worker_timeout_s if pred_t is None else min(
                            cfg.worker_timeout_s, 300 + 15 * pred_t)  # fmt: skip
                        t0 = time.perf_counter()
                        res = _run_worker(spec, timeout)
                        wall = time.perf_counter() - t0
                        rec.update(res)
                        rec["worker_wall_s"] = wall
                        if "error" in res:
                            rec.update(median_s=None, gflops=None)
                            _log(cfg, f"  FAIL {provider:17s} {mode:7s} N={n:6d} {_dims_str(dims)}: {res['error']}")
                        else:
                            rec["gflops"] = flops / res["median_s"] / 1e9 if flops else None
                            hist_t = (n, res["median_s"])
                            if res.get("peak_extra_mb") is not None:
                                hist_m = (n, max(res["peak_extra_mb"], 0.0) * 2**20)
                            pm = res.get("peak_extra_mb")
                            _log(cfg, f"  {provider:22s} {mode:7s} N={n:6d} {_dims_str(dims)}: "
                                      f"median {res['median_s'] * 1e3:10.2f} ms [p20 {res['p20_s'] * 1e3:.2f}, "
                                      f"p80 {res['p80_s'] * 1e3:.2f}] x{res['n_repeats']}  "
                                      f"{rec['gflops']:7.1f} GFLOP/s  peak +"
                                      f"{'?' if pm is None else f'{pm:.0f}'} MB  ({wall:.0f} s wall)")  # fmt: skip
                    rec.update(
                        device=env["device"], torch=env["torch"], python=env["python"],
                        git_sha=env["git_sha"], git_dirty=env["git_dirty"], timestamp=_now(),
                    )  # fmt: skip
                    key = record_key(rec)
                    if key in index:
                        records[index[key]] = rec
                    else:
                        index[key] = len(records)
                        records.append(rec)
                    save()
    _log(cfg, f"[{cfg.op}] done in {time.perf_counter() - t_start:.0f} s -> {path}")
    return path


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _dims_str(dims: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in dims.items())


# ---------------------------------------------------------------------------------------------------
# CLI helpers shared by the bench_*.py scripts
# ---------------------------------------------------------------------------------------------------
def int_list(s: str) -> list[int]:
    return [int(v) for v in s.replace(" ", "").split(",") if v]


def str_list(s: str) -> list[str]:
    return [v for v in s.replace(" ", "").split(",") if v]


def add_common_args(p: argparse.ArgumentParser, default_sizes: str, modes: Sequence[str] = MODES) -> None:
    p.add_argument("--sizes", type=int_list, default=int_list(default_sizes), help=f"N values (default {default_sizes})")
    p.add_argument("--modes", type=str_list, default=list(modes), help=f"comma list of {list(modes)}")
    p.add_argument("--providers", type=str_list, default=list(PROVIDERS), help=f"comma list of {list(PROVIDERS)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=10, help="max timed repeats per point (fewer for slow calls)")
    p.add_argument("--target-s", type=float, default=10.0, help="timing budget per point; sets the repeats")
    p.add_argument("--max-call-s", type=float, default=60.0, help="skip points predicted to take longer per call")
    p.add_argument("--mem-fraction", type=float, default=0.8, help="skip points predicted above this share of MemAvailable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default benchmarks/results/cpu)")
    p.add_argument("--fresh", action="store_true", help="start a new <op>.json instead of merging by key")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")


def validate(args: argparse.Namespace, modes: Sequence[str] = MODES) -> None:
    bad = [p for p in args.providers if p not in PROVIDERS]
    if bad:
        raise SystemExit(f"unknown provider(s) {bad}; choose from {list(PROVIDERS)}")
    bad = [m for m in args.modes if m not in modes]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {list(modes)}")


def config_from_args(args: argparse.Namespace, op: str, dims_list: list[dict], params: dict) -> SweepConfig:
    return SweepConfig(
        op=op, sizes=args.sizes, dims_list=dims_list, modes=args.modes, providers=args.providers,
        out_dir=args.out, dtype=args.dtype, params=params, repeats=args.repeats, target_s=args.target_s,
        max_call_s=args.max_call_s, mem_fraction=args.mem_fraction, seed=args.seed, fresh=args.fresh,
    )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    print(__doc__)
    print("Run benchmarks/bench_structure.py, bench_clip.py or bench_knn.py instead.")
