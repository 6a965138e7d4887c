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
  1. build the inputs (fixed seed, structured: x clustered around 32 centres, z = x W / sqrt(d_x) + 0.5 noise);
  2. warm up: eager providers on a tiny N (threads, oneDNN, autograd engine); compile_reference at full
     size (compilation needs the real shape), then gc + malloc_trim(0) to hand freed memory back;
  3. reset the peak RSS (write "5" to /proc/self/clear_refs; if that fails the fresh process is the
     reset), read VmRSS, run the op once, read VmHWM: peak_extra = VmHWM - VmRSS_before;
  4. time: optional warm-up calls, then repeats (adapted to the call time); median, p20, p80. The CPU time
     other processes used meanwhile is recorded (other_busy_cores); a contended loop is retried.
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
NOISY_CORES = 0.2  # other processes' busy cores above which a timing counts as contended


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
    """docs/kernels.md §2(a): fwd 2N²(d_x+d_z); fwd+bwd (gradient in forward) 2N²(d_x+3d_z).
    Levels L > 1 add the power products: 2 sides × (L−1) × 2N³ forward, 2 adjoint products × (L−1) × 2N³
    backward (z side only)."""
    dx, dz, levels = dims["d_x"], dims["d_z"], int(params.get("levels", 1))
    if mode == "fwd":
        return 2.0 * n * n * (dx + dz) + 4.0 * (levels - 1) * n**3
    return 2.0 * n * n * (dx + 3 * dz) + 8.0 * (levels - 1) * n**3


def _clip_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    """docs/kernels.md §4: fwd 2N²d; fwd+bwd 8N²d (one forward pass + one recomputing backward pass)."""
    return (2.0 if mode == "fwd" else 8.0) * n * n * dims["d"]


def _siglip_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    """Row panels, gradient in forward (csrc/cpu/siglip_cpu.cpp): fwd 2N²d; fwd+bwd 6N²d (the logits panel,
    dA = s·w B and dB += s·wᵀ A)."""
    return (2.0 if mode == "fwd" else 6.0) * n * n * dims["d"]


def _knn_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    """2N²d per side (the Gram panels); the selection is not counted."""
    return 2.0 * n * n * dims["d"]


def _mutual_knn_flops(n: int, dims: dict, mode: str, params: dict) -> float:
    return 4.0 * n * n * dims["d"]


OPS: dict[str, OpDef] = {
    "structure": OpDef(
        "structure",
        ("d_x", "d_z"),
        MODES,
        _structure_flops,
        # reference measured at N=2048: fwd ~16, fwd+bwd ~21 N x N fp32 matrices
        {
            ("reference", "fwd"): 16,
            ("reference", "fwd+bwd"): 22,
            ("compile_reference", "fwd"): 16,
            ("compile_reference", "fwd+bwd"): 22,
            ("cpu", "fwd"): 2,
            ("cpu", "fwd+bwd"): 4,
        },
    ),
    "clip": OpDef(
        "clip",
        ("d",),
        MODES,
        _clip_flops,
        {
            ("reference", "fwd"): 4,
            ("reference", "fwd+bwd"): 8,
            ("compile_reference", "fwd"): 4,
            ("compile_reference", "fwd+bwd"): 8,
            ("cpu", "fwd"): 1,
            ("cpu", "fwd+bwd"): 1,
        },
    ),
    "siglip": OpDef(
        "siglip",
        ("d",),
        MODES,
        _siglip_flops,
        {
            ("reference", "fwd"): 4,
            ("reference", "fwd+bwd"): 8,
            ("compile_reference", "fwd"): 4,
            ("compile_reference", "fwd+bwd"): 8,
            ("cpu", "fwd"): 1,
            ("cpu", "fwd+bwd"): 1,
        },
    ),
    "knn": OpDef(
        "knn",
        ("d",),
        ("fwd",),
        _knn_flops,
        {("reference", "fwd"): 6, ("compile_reference", "fwd"): 6, ("cpu", "fwd"): 1},
    ),
    "mutual_knn": OpDef(
        "mutual_knn",
        ("d",),
        ("fwd",),
        _mutual_knn_flops,
        {("reference", "fwd"): 8, ("compile_reference", "fwd"): 8, ("cpu", "fwd"): 1},
    ),
}


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]  # fmt: skip


N_CLUSTERS = 32


def _clustered(n: int, d: int, g) -> torch.Tensor:  # noqa: F821
    """Rows drawn around N_CLUSTERS random centres (within-cluster cosine ~0.8): features with real
    neighbourhoods. Isotropic randn rows would make softmax(S/τ) ≈ I at τ = 0.05 (every row its own only
    neighbour), an unrepresentative regime."""
    import torch

    labels = torch.randint(0, N_CLUSTERS, (n,), generator=g)
    return torch.randn(N_CLUSTERS, d, generator=g)[labels] + 0.5 * torch.randn(n, d, generator=g)


def _paired(u, d: int, g) -> torch.Tensor:  # noqa: F821
    """The second view: a random linear map of the first plus noise, z = u W / sqrt(d_u) + 0.5 noise."""
    import torch

    w = torch.randn(u.shape[1], d, generator=g) / math.sqrt(u.shape[1])
    return u @ w + 0.5 * torch.randn(u.shape[0], d, generator=g)


def make_inputs(op: str, n: int, dims: dict, dtype: str = "float32", seed: int = 0, mode: str = "fwd") -> list:
    """Structured inputs with a fixed seed: clustered first view, correlated second view (see
    :func:`_clustered`, :func:`_paired`). In fwd+bwd mode the differentiated inputs require grad."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = _dtype(dtype)
    grad = mode == "fwd+bwd"
    if op == "structure":
        x = _clustered(n, dims["d_x"], g)
        z = _paired(x, dims["d_z"], g)
        return [x.to(dt), z.to(dt).requires_grad_(grad)]
    a = _clustered(n, dims["d"], g)
    b = _paired(a, dims["d"], g)
    if op == "clip":
        scale = torch.tensor(1.0 / 0.07)  # open_clip's initial logit_scale.exp()
        return [a.to(dt).requires_grad_(grad), b.to(dt).requires_grad_(grad), scale.to(dt).requires_grad_(grad)]
    if op == "siglip":  # the SigLIP paper's initialization: s = exp(log 10), β = −10
        scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
        return [a.to(dt).requires_grad_(grad), b.to(dt).requires_grad_(grad), scale.to(dt).requires_grad_(grad),
                bias.to(dt).requires_grad_(grad)]  # fmt: skip
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
    elif op == "siglip":

        def ref(image, text, scale, bias):
            return R.siglip_loss(image, text, scale, bias)

        def cpu(image, text, scale, bias):
            return so.siglip_loss(image, text, scale, bias, backend="cpu")
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
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    res: dict = {"threads": torch.get_num_threads(), "loadavg_1min_before": _loadavg()}

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
    elif spec.get("mem_warmup") == "full":  # cross-check of the tiny warm-up (same numbers expected)
        fn = make_fn(op, provider, params, n)
        step = make_step(fn, inputs, mode)
        step()
        res["mem_warmup"] = "full-size call + gc + malloc_trim"
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
    if spec.get("calibrate"):
        reps, warmup = 3, 0
    else:
        reps = choose_repeats(first, max_repeats, float(spec.get("target_s", 10.0)))
        warmup = int(spec.get("warmup", 1 if first < 5 else 0))
    for _ in range(warmup):
        step()
    # Other processes on the cores make OpenMP code 5-10x slower in jumps; a contended timing loop is
    # repeated (up to noisy_retries times, after a pause) when that costs little, and the least contended
    # attempt is kept.
    retries = int(spec.get("noisy_retries", 2))
    attempts = []
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(float(spec.get("noisy_pause_s", 5.0)))
        samples = []
        gc.collect()
        busy0 = _cpu_busy()
        for _ in range(reps):
            t0 = time.perf_counter()
            out = step()
            samples.append(time.perf_counter() - t0)
            del out
        others = _other_busy_cores(busy0, _cpu_busy())
        attempts.append((others if others is not None else 0.0, samples))
        if others is None or others <= NOISY_CORES or sum(samples) > 20.0:
            break
    others, samples = min(attempts, key=lambda a: a[0])
    res["loadavg_1min_after"] = _loadavg()
    res["other_busy_cores"] = others
    res["timing_attempts"] = len(attempts)
    xs = sorted(samples)
    res.update(
        median_s=_percentile(xs, 0.5), p20_s=_percentile(xs, 0.2), p80_s=_percentile(xs, 0.8),
        min_s=xs[0], n_repeats=reps, n_warmup=warmup + 1, samples_s=samples,
    )  # fmt: skip
    return res


def _loadavg() -> float | None:
    """1-minute load average: a value well above the torch thread count means the timings shared the
    cores with other work (OpenMP barriers then stall; compiled code with many parallel regions suffers
    most)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _cpu_busy() -> tuple[float, float, float] | None:
    """(machine busy CPU seconds, this process's CPU seconds, wall time) for :func:`_other_busy_cores`."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def _other_busy_cores(a, b) -> float | None:
    """Average number of cores kept busy by other processes between two :func:`_cpu_busy` readings:
    the direct measure of contention (well above 0 means the timings shared the cores)."""
    if a is None or b is None or b[2] - a[2] < 0.05:
        return None
    return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))


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
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are shared files
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
            res = json.loads(line[len(RESULT_MARK) :])
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
    mem_fraction: float = 0.7
    worker_timeout_s: float = 1800.0
    seed: int = 0
    threads: int | None = None
    noisy_retries: int = 2
    fresh: bool = False
    verbose: bool = True
    ceilings: str | None = "measure"  # "measure" (this machine, at sweep start), a JSON file of them, or None


def _log(cfg: SweepConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, flush=True)


def _time_exponent(op: str, params: dict) -> float:
    if op == "structure" and int(params.get("levels", 1)) > 1:
        return 3.0
    return 2.0


CALIBRATION_N = 1024


def _calibrate(cfg: SweepConfig, provider: str, mode: str, dims: dict) -> tuple[int, float] | None:
    """Time one call at N=1024 (not recorded) so that the first, larger N of a sweep can be predicted."""
    spec = {"op": cfg.op, "provider": provider, "mode": mode, "N": CALIBRATION_N, "dims": dims, "dtype": cfg.dtype,
            "params": cfg.params, "seed": cfg.seed, "measure_memory": False, "calibrate": True,
            "threads": cfg.threads}  # fmt: skip
    res = _run_worker(spec, 600)
    if "error" in res:
        _log(cfg, f"  calibration of {provider} {mode} at N={CALIBRATION_N} failed: {res['error']}")
        return None
    _log(cfg, f"  calibration {provider} {mode} N={CALIBRATION_N}: {res['median_s'] * 1e3:.1f} ms per call")
    return CALIBRATION_N, res["median_s"]


@dataclass
class _History:
    """What the previous (smaller) N of one (provider, mode, dims) series told us."""

    time: tuple[int, float] | None = None  # (N, seconds per call), measured or predicted
    mem: tuple[int, float] | None = None  # (N, peak extra bytes), measured
    failed_at: int | None = None
    calibrated: bool = False


def _skip_reason(cfg: SweepConfig, provider: str, mode: str, n: int, dims: dict, hist: _History) -> str | None:
    """Why this point should not run (predicted too slow or too large for the machine), or None."""
    if hist.failed_at is not None:
        return f"failed at the smaller N={hist.failed_at}"
    if hist.time is None and n > CALIBRATION_N and not hist.calibrated:
        hist.calibrated = True
        hist.time = _calibrate(cfg, provider, mode, dims)
    if hist.mem and hist.mem[0] >= 512:
        pred_m = hist.mem[1] * (n / hist.mem[0]) ** 2
        how = f"scaled (N/{hist.mem[0]})^2 from the measured {hist.mem[1] / 2**20:.0f} MB"
    else:
        factor = OPS[cfg.op].nn_factor.get((provider, mode), 4)
        pred_m = factor * n * n * _dtype(cfg.dtype).itemsize
        how = f"~{factor} N x N {cfg.dtype} matrices"
    avail = mem_available_bytes()
    if avail is not None and pred_m > cfg.mem_fraction * avail:
        return (
            f"predicted peak extra memory {pred_m / 2**30:.3g} GiB ({how}) > "
            f"{cfg.mem_fraction:.0%} of available {avail / 2**30:.3g} GiB"
        )
    if hist.time is not None:
        pred_t = hist.time[1] * (n / hist.time[0]) ** _time_exponent(cfg.op, cfg.params)
        if pred_t > cfg.max_call_s:
            reason = f"predicted {pred_t:.3g} s per call (scaled from N={hist.time[0]}) > limit {cfg.max_call_s:.3g} s"
            hist.time = (n, pred_t)
            return reason
    return None


def _measure(cfg: SweepConfig, provider: str, mode: str, n: int, dims: dict, hist: _History) -> dict:
    """Run one point in a fresh worker process; update the series history."""
    spec = {
        "op": cfg.op, "provider": provider, "mode": mode, "N": n, "dims": dims, "dtype": cfg.dtype,
        "params": cfg.params, "seed": cfg.seed, "repeats": cfg.repeats, "target_s": cfg.target_s,
        "threads": cfg.threads, "noisy_retries": cfg.noisy_retries,
    }  # fmt: skip
    timeout = cfg.worker_timeout_s
    if hist.time is not None:
        pred_t = hist.time[1] * (n / hist.time[0]) ** _time_exponent(cfg.op, cfg.params)
        timeout = min(timeout, 300 + 15 * pred_t)
    t0 = time.perf_counter()
    res = _run_worker(spec, timeout)
    res["worker_wall_s"] = time.perf_counter() - t0
    if "error" in res:
        if res["error"].startswith(("worker died", "worker timed out")):  # OOM-killed or hung: larger N will too
            hist.failed_at = n
        res.update(median_s=None, gflops=None)
        return res
    flops = OPS[cfg.op].flops(n, dims, mode, cfg.params)
    res["gflops"] = flops / res["median_s"] / 1e9 if flops else None
    hist.time = (n, res["median_s"])
    if res.get("peak_extra_mb") is not None:
        hist.mem = (n, max(res["peak_extra_mb"], 0.0) * 2**20)
    return res


def sweep(cfg: SweepConfig) -> str:
    """Run every point of ``cfg`` (each in a fresh subprocess) and write ``<out_dir>/<op>.json`` after each.

    Order: N ascending (the outer loop, so that each series can predict its next point), then mode, then
    provider: the providers of one (N, mode) run back to back, so slow drifts of the machine affect them
    alike.
    """
    opdef = OPS[cfg.op]
    env = environment()
    path = os.path.join(cfg.out_dir, f"{cfg.op}.json")
    records = [] if cfg.fresh else load_records(path)
    index = {record_key(r): i for i, r in enumerate(records)}
    t_start = time.perf_counter()
    dev = env["device"]
    _log(cfg, f"[{cfg.op}] {dev['name']} ({dev['cores']} cores, {dev['torch_threads']} threads), torch {env['torch']}")
    a = _cpu_busy()
    time.sleep(1.0)
    others = _other_busy_cores(a, _cpu_busy())
    if others is not None and others > NOISY_CORES:
        _log(cfg, f"[{cfg.op}] WARNING: other processes keep {others:.2f} cores busy: timings will be noisy")
    ceil = _ceilings(cfg, env)
    modes = [m for m in cfg.modes if m in opdef.modes]
    for m in cfg.modes:
        if m not in opdef.modes:
            _log(cfg, f"[{cfg.op}] mode {m!r} does not apply to {cfg.op} (modes {list(opdef.modes)}); not run")
    history: dict[tuple, _History] = {}
    for dims in cfg.dims_list:
        for n in sorted(cfg.sizes):
            for mode in modes:
                for provider in cfg.providers:
                    hist = history.setdefault((provider, mode, tuple(dims.items())), _History())
                    rec = {
                        "op": cfg.op, "provider": provider, "mode": mode, "N": n, "dims": dict(dims),
                        "dtype": cfg.dtype, "params": dict(cfg.params), "flops": opdef.flops(n, dims, mode, cfg.params),
                    }  # fmt: skip
                    label = f"{provider:17s} {mode:7s} N={n:6d} {_dims_str(dims)}"
                    reason = _skip_reason(cfg, provider, mode, n, dims, hist)
                    if reason:
                        rec.update(skipped=True, skip_reason=reason, median_s=None, peak_extra_mb=None, gflops=None)
                        _log(cfg, f"  skip {label}: {reason}")
                    else:
                        res = _measure(cfg, provider, mode, n, dims, hist)
                        rec.update(res)
                        if "error" in res:
                            _log(cfg, f"  FAIL {label}: " + res["error"].replace("\n", " | "))
                        else:
                            pm = res.get("peak_extra_mb")
                            _log(
                                cfg,
                                f"  {label}: median {res['median_s'] * 1e3:9.2f} ms "
                                f"[p20 {res['p20_s'] * 1e3:.2f}, p80 {res['p80_s'] * 1e3:.2f}] x{res['n_repeats']} "
                                f"{res['gflops']:6.1f} GFLOP/s  peak +{'?' if pm is None else f'{pm:.0f}'} MB "
                                f"(others busy {res.get('other_busy_cores') or 0:.2f} cores, "
                                f"{res['worker_wall_s']:.0f} s)",
                            )
                    if roofline is not None:  # model FLOPs / special-function ops / bytes, the bound, the fraction
                        roofline.annotate(rec, ceil)
                    rec.update(
                        device=dev, torch=env["torch"], python=env["python"],
                        git_sha=env["git_sha"], git_dirty=env["git_dirty"], timestamp=_now(),
                    )  # fmt: skip
                    if record_key(rec) in index:
                        records[index[record_key(rec)]] = rec
                    else:
                        index[record_key(rec)] = len(records)
                        records.append(rec)
                    add_speedups(records)
                    write_json_atomic(
                        path,
                        {"schema": SCHEMA, "op": cfg.op, "updated": _now(), "environment": env, "records": records},
                    )
    _log(cfg, f"[{cfg.op}] done in {time.perf_counter() - t_start:.0f} s -> {path}")
    return path


try:  # benchmarks/roofline.py (this folder is on sys.path for the bench scripts, the tests and the workers)
    import roofline
except ImportError:  # pragma: no cover - imported as a package module from elsewhere
    roofline = None


def _ceilings(cfg: SweepConfig, env: dict):
    """This machine's ceilings for the roofline bound (measured once per sweep, or read from a JSON file
    written by ``python benchmarks/roofline.py ceilings``); recorded in the environment of the JSON."""
    if roofline is None or not cfg.ceilings:
        return None
    if cfg.ceilings != "measure":
        with open(cfg.ceilings) as f:
            ceil = roofline.Ceilings.from_dict(json.load(f))
        env["ceilings"] = {**ceil.to_dict(), "file": cfg.ceilings}
        return ceil
    a = _cpu_busy()
    ceil = roofline.measure_cpu_ceilings(threads=cfg.threads)
    busy = _other_busy_cores(a, _cpu_busy())
    env["ceilings"] = {**ceil.to_dict(), "other_busy_cores": busy, "measured": _now()}
    _log(
        cfg,
        f"[{cfg.op}] ceilings: fp32 GEMM {ceil.gemm['fp32'] / 1e9:.0f} GFLOP/s, memory {ceil.mem_bw / 1e9:.1f} GB/s, "
        f"exp {ceil.sfu / 1e9:.2f} G/s" + (f" (others kept {busy:.2f} cores busy)" if busy else ""),
    )
    return ceil


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
    p.add_argument(
        "--sizes", type=int_list, default=None, help=f"N values (default {default_sizes}; with --quick 256,512)"
    )
    p.add_argument("--modes", type=str_list, default=list(modes), help=f"comma list of {list(modes)}")
    p.add_argument("--providers", type=str_list, default=list(PROVIDERS), help=f"comma list of {list(PROVIDERS)}")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=10, help="max timed repeats per point (fewer for slow calls)")
    p.add_argument("--target-s", type=float, default=10.0, help="timing budget per point; sets the repeats")
    p.add_argument("--max-call-s", type=float, default=60.0, help="skip points predicted to take longer per call")
    p.add_argument(
        "--mem-fraction", type=float, default=0.7, help="skip points predicted above this share of MemAvailable"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers (default: torch's)")
    p.add_argument(
        "--noisy-retries", type=int, default=2,
        help="repeat a timing loop (after 5 s) when other processes kept the cores busy during it",
    )  # fmt: skip
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default benchmarks/results/cpu)")
    p.add_argument("--fresh", action="store_true", help="start a new <op>.json instead of merging by key")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")
    p.add_argument(
        "--ceilings", default="measure",
        help="roofline ceilings: 'measure' (default, ~5 s at sweep start), a JSON file "
        "(python benchmarks/roofline.py ceilings > FILE), or 'none'",
    )  # fmt: skip


QUICK_SIZES = [256, 512]


def finish_args(args: argparse.Namespace, default_sizes: str, modes: Sequence[str] = MODES) -> None:
    """Apply --quick (small sizes unless --sizes was given, 3 repeats, 1 s per point) and validate."""
    if args.quick:
        args.sizes = args.sizes or QUICK_SIZES
        args.repeats, args.target_s = min(args.repeats, 3), 1.0
    args.sizes = args.sizes or int_list(default_sizes)
    validate(args, modes)


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
        max_call_s=args.max_call_s, mem_fraction=args.mem_fraction, seed=args.seed, threads=args.threads,
        noisy_retries=args.noisy_retries, fresh=args.fresh,
        ceilings=None if getattr(args, "ceilings", "measure") == "none" else getattr(args, "ceilings", "measure"),
    )  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2]))
    print(__doc__)
    print("Run benchmarks/bench_structure.py, bench_clip.py or bench_knn.py instead.")
