"""Shared by the Triton kernels: precision policy, tf32 rounding, device guard, dtypes, interpreter detection,
panel sizing, autotuning (``TuneSpace``: see the section at the end and docs/kernels.md, "Autotuning").

TF32 (torch.get_float32_matmul_precision() "high"/"medium" on fp32 inputs): ``tl.dot(..., input_precision="tf32")``
feeds fp32 operands to the tensor cores as they are, and the hardware ignores their low 13 mantissa bits, i.e.
TRUNCATES them toward zero (no cvt.rna in Triton's PTX; upstream triton issue 4574). Truncation biases every
product the same way (|x̃| ≤ |x|): a dot product of two unit vectors shrinks by ~2^-11 on average, so cosine
logits at τ = 0.05 lose ~0.1 % of τ and the error of D is ~7e-4 at N = 4096, d = 1024 where cuBLAS's rounding
(round to nearest, ties away: cvt.rna.tf32.f32) gives ~1e-6 (float64 emulation, tests/emulation/hardware.py).
The kernels therefore round every fp32 tl.dot operand to tf32 themselves (``tf32_rna``: bitcast to uint32, add
half a tf32 ulp, clear the low 13 bits) before a tf32 dot: the hardware then sees operands with nothing left
to truncate and the result is what cuBLAS TF32 computes, up to summation order. Why not "tf32x3": it is three
tensor-core products per dot (the throughput of IEEE-emulating fp32), and "high" is the user's request for
single-pass TF32; "highest" (torch's default) already gives IEEE fp32 dots for those who claim fp32 accuracy.
The rounding is plain integer arithmetic, so the interpreter executes it too: there the dot itself is exact,
and interpreted kernels at "high" reproduce the hardware's rounded operands exactly (the tests compare them with
the float64 model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernels that take a DOT_PRECISION constexpr pass it to tl.dot(..., input_precision=DOT_PRECISION).
_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}
PRECISIONS = tuple(_PRECISION)  # torch's float32 matmul precision modes


def dot_precision(dtype: torch.dtype, precision: str | None = None) -> str:
    """tl.dot input precision for inputs of ``dtype`` (docs/kernels.md §6).

    fp32 follows ``precision`` (default: torch.get_float32_matmul_precision()): "highest" → IEEE fp32,
    "high"/"medium" → TF32 with operands rounded by the kernel (``round_tf32``; Triton has no bf16 mode for fp32
    operands, and "medium" allows TF32). bf16/fp16 use tensor cores with fp32 accumulation whatever the setting
    (the value is then ignored by tl.dot). fp64 → "ieee".
    """
    if dtype == torch.float32:
        return _PRECISION[precision or torch.get_float32_matmul_precision()]
    return "ieee"


def round_tf32(dtype: torch.dtype, precision: str | None = None) -> bool:
    """Whether the kernels round fp32 dot operands to tf32 (RNA) before tl.dot: exactly when the dot is tf32."""
    return dtype == torch.float32 and dot_precision(dtype, precision) == "tf32"


@triton.jit
def tf32_rna(x):
    # fp32 → the nearest tf32 value (10 mantissa bits), ties away from zero, as cvt.rna.tf32.f32 and cuBLAS: add
    # half a tf32 ulp (0x1000) to the bit pattern and clear the 13 low bits. A carry into the exponent is the next
    # binade (correct), past the largest finite value it is inf (as cvt.rna); inf stays inf; NaN is passed
    # through explicitly (the carry of an all-ones payload would reach the sign bit).
    bits = x.to(tl.uint32, bitcast=True)
    r = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, r)


@triton.jit
def dot_operand(x, ROUND_TF32: tl.constexpr):
    # An fp32 tl.dot operand as the tf32 tensor cores should see it (see the module docstring).
    if ROUND_TF32:
        return tf32_rna(x)
    return x


# Every kernel launch runs under ``device_guard(t.device)`` of its tensors: Triton launches on the CURRENT CUDA
# device, so a tensor on cuda:1 launched while cuda:0 is current reads another device's memory. The stack of
# guarded devices lets the tests check (behaviourally, on CPU) that each launch path sits inside a guard.
_guard = threading.local()


@contextlib.contextmanager
def device_guard(device: torch.device | str):
    """Make ``device`` current for the launches inside (torch.cuda.device for CUDA; a no-op for CPU tensors in the
    interpreter); records it for ``guarded_device``."""
    device = torch.device(device)
    stack = _guard.__dict__.setdefault("stack", [])
    stack.append(device)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        stack.pop()


def guarded_device() -> torch.device | None:
    """The device of the innermost active ``device_guard`` on this thread (None outside every guard)."""
    stack = getattr(_guard, "stack", None)
    return stack[-1] if stack else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and divergence math: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


PANEL_FREE_FRACTION = 0.5  # share of the free device memory (free + cached) that row panels may take
# Default cap of the row panels on a CUDA device (STRUCTURE_OPS_TRITON_PANEL_MB overrides it), as the CUDA backend's
# STRUCTURE_OPS_CUDA_PANEL_MB default: issue 14's level-1 target of ≤ 2 GiB beyond inputs and outputs at N = 262 144.
PANEL_CAP_MB = 2048.0


def free_device_bytes(device: torch.device | str | None) -> int | None:
    """Free memory of a CUDA device (cudaMemGetInfo's free + what the caching allocator holds unused); None for
    CPU tensors (the interpreter) or no device."""
    if device is None or torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def panel_rows(n: int, bytes_per_row: int, budget_mb: float | None = None, device=None) -> int:
    """Rows per panel (at least 1, at most n) so that panel buffers of ``bytes_per_row`` each fit a budget: an
    explicit ``budget_mb``; otherwise, on a CUDA ``device``, PANEL_FREE_FRACTION of its free memory capped by
    STRUCTURE_OPS_TRITON_PANEL_MB when that is set, else by PANEL_CAP_MB (2048 MiB); without a device (CPU /
    interpreter) STRUCTURE_OPS_TRITON_PANEL_MB or 256 MiB."""
    if budget_mb is not None:
        budget = budget_mb * (1 << 20)
    else:
        env = os.environ.get("STRUCTURE_OPS_TRITON_PANEL_MB")
        cap = float(env) * (1 << 20) if env else None
        free = free_device_bytes(device)
        if free is None:
            budget = cap if cap is not None else 256.0 * (1 << 20)
        else:
            cap = PANEL_CAP_MB * (1 << 20) if cap is None else cap
            budget = min(cap, PANEL_FREE_FRACTION * free)
    return max(1, min(n, int(budget) // max(1, bytes_per_row)))


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, int(x)))



# ---------------------------------------------------------------------------------------------------------------
# Elementwise and row helpers shared by the kernels (inlined by @triton.jit)
# ---------------------------------------------------------------------------------------------------------------
# Only core builtins inside the kernels (tl.full / tl.reduce, not tl.zeros / tl.sum / tl.max): those are @jit
# functions of triton.language.standard, and when triton was imported before TRITON_INTERPRET=1 was set (torch
# imports triton) the interpreter refuses to call them. Same code on the GPU.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


if INTERPRET:
    # The interpreter reduces with numpy only for the standard combine functions (compared by identity, never
    # called); with our own it runs a Python loop (~3x slower).
    _add = getattr(tl.standard, "_sum_combine", _add)
    _max2 = getattr(tl.standard, "_elementwise_max", _max2)


@triton.jit
def row_sum(x):
    return tl.reduce(x, 1, _add)


@triton.jit
def row_max(x):
    return tl.reduce(x, 1, _max2)


@triton.jit
def log1p(x):
    # No libdevice (portable subset): log1p(x) = log(u)·x/(u − 1), u = fl(1 + x) (Goldberg). u − 1 is exact, and
    # the ratio x/(u − 1) restores what rounding 1 + x lost, so the result is within a few ulp for all x > −1.
    # tl.log is libdevice-accurate on the GPU (not lg2.approx), which this identity needs near u = 1.
    u = 1.0 + x
    d = u - 1.0
    r = tl.log(u) * (x / tl.where(d == 0.0, 1.0, d))
    r = tl.where(d == 0.0, x, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def level1_terms(a, b, eps, ln2, JS: tl.constexpr):
    # The level-1 divergence, elementwise, from log-probabilities a = log P, b = log Q (docs/kernels.md §1).
    # Returns P, Q, term, Q∘g, P∘g_o with g = ∂term/∂Q, g_o = ∂term/∂P up to additive constants (they cancel in
    # g − ḡ because Σ_j Q_ij = 1). ``eps`` and ``ln2`` come in the compute dtype (a float literal would be fp32).
    p = tl.exp(a)
    q = tl.exp(b)
    if JS:
        # log(Q/M) = ln2 − softplus(a − b), log(P/M) = ln2 − softplus(b − a): no ε, never underflows.
        delta = a - b
        sp = tl.maximum(delta, 0.0) + log1p(tl.exp(-tl.abs(delta)))
        log_q_m = ln2 - sp
        log_p_m = ln2 - (sp - delta)
        term = 0.5 * (p * log_p_m + q * log_q_m)
        qg = 0.5 * q * log_q_m
        pg = 0.5 * p * log_p_m
    else:
        # Stable bracket: 2 log M̃ − log P̃ − log Q̃ = log1p((d/P̃)(d/Q̃)/4); the factored product keeps every
        # intermediate within [0, 1/ε] (P̃·Q̃ would underflow for a tiny ε, log1p(−r²) hits −inf in fp32).
        pt = p + eps
        qt = q + eps
        d = pt - qt
        ro = 1.0 / pt
        ra = 1.0 / qt
        t = log1p((d * ro) * (d * ra) * 0.25)
        term = 0.25 * (pt + qt) * t
        # Q·P̃/Q̃ as P̃·(Q/Q̃) ≤ P̃: no 1/ε-sized intermediate.
        qg = 0.25 * q * t - 0.25 * pt * (q * ra)
        pg = 0.25 * p * t - 0.25 * qt * (p * ro)
    return p, q, term, qg, pg


# ---------------------------------------------------------------------------------------------------------------
# Autotuning: tile spaces declared as data, one choice per (space, shape bucket, dtype, precision, device)
# ---------------------------------------------------------------------------------------------------------------
# Why not triton.autotune itself: it keys on the exact values of kernel arguments (every new N, e.g. a ragged last
# batch or a benchmark sweep, would re-benchmark the whole space), it benchmarks under the interpreter too (do_bench
# needs a GPU), and its choice lives inside one kernel object. Here a kernel module declares its space once
# (``TuneSpace``: the configurations as data, a heuristic, a shared-memory estimate), the host builds a key from
# shape buckets (``autotune_key``: next power of two of N and d, dtype, float32 matmul precision, options) and asks
# ``TuneSpace.choose(key, bench)`` for a config; aot.py compiles every config of every declared space.
#
# Knobs (read at each call):
#   STRUCTURE_OPS_AUTOTUNE=0        no benchmarking: the space's deterministic heuristic choice (also always under
#                                   TRITON_INTERPRET=1, so CPU tests never benchmark)
#   STRUCTURE_OPS_AUTOTUNE_FORCE    "space:index[,space:index...]" (or "*:index"): launch that config of the
#                                   declared space whatever the key (tests run every config in the interpreter)
#   STRUCTURE_OPS_AUTOTUNE_CACHE    a JSON file: benchmark choices are loaded from it and written back (atomically)
# ``autotune_cache()`` returns every choice made in this process (config, how it was chosen, the timings).
AUTOTUNE_ENV = "STRUCTURE_OPS_AUTOTUNE"
AUTOTUNE_FORCE_ENV = "STRUCTURE_OPS_AUTOTUNE_FORCE"
AUTOTUNE_CACHE_ENV = "STRUCTURE_OPS_AUTOTUNE_CACHE"
# Limits used to prune a space when no device can be asked (the interpreter, aot.py): an sm_90 SM (H100/H200).
SM90_LIMITS = {"max_shared_mem": 232448, "max_num_regs": 65536, "cc": 90}


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """One candidate launch: constexprs (kernel meta-parameters) plus num_warps and num_stages."""

    constexprs: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    def __getitem__(self, name: str):
        return dict(self.constexprs)[name]

    @property
    def meta(self) -> dict:
        return dict(self.constexprs)

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    @property
    def name(self) -> str:
        return ",".join([f"{k}={v}" for k, v in self.constexprs] + [f"w{self.num_warps}", f"s{self.num_stages}"])


def config_grid(*, num_warps=(4, 8), num_stages=(2,), where=None, **axes) -> tuple[TuneConfig, ...]:
    """The cartesian product of ``axes`` (constexpr name → values, in the given order), ``num_warps`` and
    ``num_stages``, keeping the configs for which ``where(meta: dict, num_warps, num_stages)`` is true (the declared
    pruning: e.g. the tiles that spill registers on sm_90, each with a comment at the declaration)."""
    names = list(axes)
    out = []
    for values in itertools.product(*(axes[n] for n in names)):
        meta = dict(zip(names, (int(v) for v in values), strict=True))
        for w in num_warps:
            for s in num_stages:
                if where is None or where(meta, int(w), int(s)):
                    out.append(TuneConfig(tuple(meta.items()), int(w), int(s)))
    return tuple(out)


_SPACES: dict[str, TuneSpace] = {}
_CHOICES: dict[str, dict[str, dict]] = {}
_CHOICES_LOCK = threading.Lock()
_DISK: dict | None = None


@dataclasses.dataclass(eq=False)  # compared and hashed by identity (one object per declared space)
class TuneSpace:
    """A kernel's autotune space, declared once as data.

    name: "module.kernel" (the key of STRUCTURE_OPS_AUTOTUNE_FORCE and of ``autotune_cache()``).
    configs: every candidate (``config_grid``); aot.py compiles all of them (for every variant the module lists in
        its ``aot_configs()``).
    heuristic: key → the config chosen without benchmarking (interpreter, STRUCTURE_OPS_AUTOTUNE=0); must return a
        member of ``configs`` (deterministic).
    smem: (config, key) → estimated shared-memory bytes; candidates above the device's limit are pruned before
        benchmarking (None: no estimate). Register spills are pruned at declaration (aot.py --no-spills decides) and
        again at run time: a candidate whose compiled kernel reports spills is never chosen.
    allowed: (config, key) → False for configs that are not candidates for this key (declared pruning that depends
        on the variant, e.g. a tile that spills only with fp32 operands; None: every config). aot.py compiles exactly
        the candidates of each variant's key.
    """

    name: str
    configs: tuple[TuneConfig, ...]
    heuristic: Callable[[dict], TuneConfig]
    smem: Callable[[TuneConfig, dict], int] | None = None
    allowed: Callable[[TuneConfig, dict], bool] | None = None

    def __post_init__(self):
        if not self.configs:
            raise ValueError(f"autotune space {self.name}: no configurations")
        _SPACES[self.name] = self

    def index(self, config: TuneConfig) -> int:
        return self.configs.index(config)

    def candidates(self, key: dict, limits: dict | None = None) -> list[TuneConfig]:
        """The configs ``allowed`` for ``key`` that fit ``limits`` (default: an sm_90 SM) by the shared-memory
        estimate: what the autotuner benchmarks, and what aot.py compiles."""
        limits = limits or SM90_LIMITS
        out = [c for c in self.configs if self.allowed is None or self.allowed(c, key)]
        if self.smem is not None:
            out = [c for c in out if self.smem(c, key) <= limits["max_shared_mem"]]
        return out

    def choose(self, key: dict, bench: Callable[[TuneConfig], object] | None = None,
               device: torch.device | str | None = None) -> TuneConfig:  # fmt: skip
        """The config for ``key``: forced (STRUCTURE_OPS_AUTOTUNE_FORCE), else the heuristic when not benchmarking
        (interpreter, STRUCTURE_OPS_AUTOTUNE=0, no ``bench``, a non-CUDA device), else the fastest candidate by
        ``triton.testing.do_bench(lambda: bench(config))``, cached per key and device. ``bench(config)`` launches
        the kernel(s) with that config on the real arguments: it must only overwrite its outputs (no accumulation),
        and may return the launched kernel(s) so that spilling candidates are skipped."""
        forced = forced_config_index(self.name)
        if forced is not None:
            if not 0 <= forced < len(self.configs):
                raise ValueError(f"{AUTOTUNE_FORCE_ENV}: {self.name} has configs 0..{len(self.configs) - 1}, "
                                 f"got {forced}")  # fmt: skip
            cfg = self.configs[forced]
            self._record(key, None, cfg, "forced")
            return cfg
        device = torch.device(device) if device is not None else None
        if bench is None or not autotune_enabled() or device is None or device.type != "cuda":
            cfg = self.heuristic(key)
            if cfg not in self.candidates(key):
                raise AssertionError(f"{self.name}: heuristic returned a config outside the space: {cfg.name}")
            self._record(key, None, cfg, "heuristic")
            return cfg
        dev_key = _device_key(device)
        skey = key_string(key)
        with _CHOICES_LOCK:
            hit = _CHOICES.get(self.name, {}).get(f"{dev_key}|{skey}") or _disk_lookup(self.name, dev_key, skey)
        if hit is not None and hit.get("source") == "benchmark":
            return self.configs[hit["index"]]
        return self._benchmark(key, bench, device, dev_key)

    def _benchmark(self, key, bench, device, dev_key) -> TuneConfig:
        from triton.testing import do_bench

        limits = device_limits(device)
        timings, skipped = {}, {}
        for cfg in self.candidates(key, limits):
            try:
                launched = bench(cfg)  # the first call compiles
                spills = [getattr(k, "n_spills", 0) or 0 for k in _as_list(launched)]
                if any(spills):
                    skipped[cfg.name] = f"{max(spills)} spilled registers"
                    continue
                timings[cfg.name] = float(do_bench(lambda cfg=cfg: bench(cfg), warmup=5, rep=20))
            except Exception as e:  # out of resources on this device: not a candidate here
                skipped[cfg.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not timings:
            raise RuntimeError(f"autotune {self.name}: no candidate ran for {key_string(key)}: {skipped}")
        best = min(timings, key=timings.get)
        cfg = next(c for c in self.configs if c.name == best)
        self._record(key, dev_key, cfg, "benchmark", timings, skipped)
        return cfg

    def _record(self, key, dev_key, cfg, source, timings=None, skipped=None) -> None:
        rec = {"config": cfg.name, "index": self.index(cfg), "source": source, "key": dict(key)}
        if dev_key is not None:
            rec["device"] = dev_key
        if timings is not None:
            rec["timings_ms"] = {k: round(v, 6) for k, v in timings.items()}
            rec["skipped"] = dict(skipped or {})
        with _CHOICES_LOCK:
            _CHOICES.setdefault(self.name, {})[f"{dev_key or source}|{key_string(key)}"] = rec
        if source == "benchmark":
            _disk_store(self.name, dev_key, key_string(key), rec)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def space_aot_entries(space: TuneSpace, kernel, variants, signature) -> list[tuple]:
    """aot.py entries (kernel, signature, constexprs, options) for EVERY candidate config of ``space`` and variant.

    ``variants``: iterable of (pointer type, constexprs) or (pointer type, constexprs, key): the module's non-tuned
    constexprs for each dtype, precision and option it can launch (a config's own constexprs override them) and,
    with a key, only ``space.candidates(key)`` (sm_90 limits) instead of every config; ``signature(kernel, ptr,
    constexprs)`` builds the kernel's signature. A module returns these from ``aot_space_configs()`` and aot.py
    compiles them all."""
    out = []
    for ptr, base, *key in variants:
        for cfg in space.candidates(key[0]) if key else space.configs:
            cst = {**base, **cfg.meta}
            cst = {a: cst[a] for a in kernel.arg_names if a in cst}
            out.append((kernel, signature(kernel, ptr, cst), cst, cfg.options))
    return out


def autotune_enabled() -> bool:
    """Whether choices are benchmarked: not under the interpreter and STRUCTURE_OPS_AUTOTUNE is not "0"."""
    return not INTERPRET and os.environ.get(AUTOTUNE_ENV, "1").strip() not in ("0", "false", "off", "")


def forced_config_index(space: str) -> int | None:
    """The index STRUCTURE_OPS_AUTOTUNE_FORCE sets for ``space`` ("space:index" entries, "*" for every space)."""
    spec = os.environ.get(AUTOTUNE_FORCE_ENV, "").strip()
    found = None
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, idx = item.rpartition(":")
        if not sep or not idx.strip().lstrip("-").isdigit():
            raise ValueError(f"{AUTOTUNE_FORCE_ENV}={spec!r}: expected 'space:index[,space:index...]'")
        if name.strip() in (space, "*"):
            found = int(idx)
            if name.strip() == space:
                return found
    return found


def autotune_key(*, n: int | None = None, d: int | None = None, dtype: torch.dtype, precision: str | None = None,
                 **extra) -> dict:  # fmt: skip
    """A cache key: N and d bucketed to the next power of two (shapes within a factor of 2 share a choice), the
    dtype, the tl.dot precision (fp32: torch's float32 matmul precision) and any module options (``extra``)."""
    key = {}
    if n is not None:
        key["n"] = next_pow2(n)
    if d is not None:
        key["d"] = next_pow2(d)
    key["dtype"] = str(dtype).replace("torch.", "")
    key["precision"] = dot_precision(dtype, precision)
    key.update(extra)
    return key


def key_string(key: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in key.items())


def device_limits(device: torch.device | str | None = None) -> dict:
    """Shared memory per block (opt-in) and registers per SM of a CUDA device; SM90_LIMITS without one."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or INTERPRET:
        return dict(SM90_LIMITS)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    props = triton.runtime.driver.active.utils.get_device_properties(idx)
    major, minor = torch.cuda.get_device_capability(idx)
    return {"max_shared_mem": int(props["max_shared_mem"]), "max_num_regs": int(props.get("max_num_regs", 65536)),
            "cc": 10 * major + minor}  # fmt: skip


def _device_key(device: torch.device) -> str:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return f"{torch.cuda.get_device_name(idx)} sm_{major}{minor} triton {triton.__version__}"


def autotune_cache() -> dict[str, dict[str, dict]]:
    """Every choice made in this process: {space name: {"<device or source>|<key>": {"config", "index", "source"
    ("benchmark" | "heuristic" | "forced"), "key", and for benchmarks "device", "timings_ms", "skipped"}}} (a copy,
    JSON-serializable: the GPU benchmark writes it next to its timings)."""
    with _CHOICES_LOCK:
        return json.loads(json.dumps(_CHOICES))


def clear_autotune_cache() -> None:
    """Forget every choice made in this process (not the STRUCTURE_OPS_AUTOTUNE_CACHE file)."""
    global _DISK
    with _CHOICES_LOCK:
        _CHOICES.clear()
        _DISK = None


def autotune_spaces() -> dict[str, TuneSpace]:
    """Every declared space (of the kernel modules imported so far)."""
    return dict(_SPACES)


def _load_disk() -> dict:
    global _DISK
    if _DISK is None:
        try:
            with open(os.environ[AUTOTUNE_CACHE_ENV]) as f:
                _DISK = json.load(f)
        except (OSError, ValueError):
            _DISK = {}
    return _DISK


def _disk_lookup(space: str, dev_key: str, skey: str) -> dict | None:
    # (called with _CHOICES_LOCK held)
    if not os.environ.get(AUTOTUNE_CACHE_ENV):
        return None
    rec = _load_disk().get(space, {}).get(f"{dev_key}|{skey}")
    sp = _SPACES.get(space)
    # a file from an older space: ignore entries whose index no longer names the same config
    if rec is None or sp is None or not 0 <= rec.get("index", -1) < len(sp.configs):
        return None
    return rec if sp.configs[rec["index"]].name == rec.get("config") else None


def _disk_store(space: str, dev_key: str, skey: str, rec: dict) -> None:
    path = os.environ.get(AUTOTUNE_CACHE_ENV)
    if not path:
        return
    with _CHOICES_LOCK:
        disk = _load_disk()
        disk.setdefault(space, {})[f"{dev_key}|{skey}"] = rec
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(disk, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
