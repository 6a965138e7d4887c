"""Backend registry: which implementation runs an op, and why the others cannot.

``backend="auto"`` walks AUTO_ORDER and takes the first backend with no reason against it;
``STRUCTURE_OPS_BACKEND`` replaces "auto" (an explicit ``backend=`` argument still wins). An explicit
request that cannot run raises, listing every backend with its reasons (xformers style): we never fall
back silently.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ._ops import cuda_targets, extension_error

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
OPS = ("structure_loss", "clip_loss", "knn", "siglip_loss")
_COMPILED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_ERROR: list[str | None] = []


def triton_error() -> str | None:
    """Import the Triton backend (registering its kernels); None if it loaded, else the reason."""
    if not _TRITON_ERROR:
        try:
            importlib.import_module("structure_ops._triton.ops")
            _TRITON_ERROR.append(None)
        except Exception as exc:  # ImportError, or a triton too old for the kernels
            _TRITON_ERROR.append(f"the Triton backend failed to load ({type(exc).__name__}: {exc})")
    return _TRITON_ERROR[0]


TRITON_PASSES = ("auto", "rows", "flash")


@torch.compiler.assume_constant_result
def triton_pass() -> str:
    """Level-1 pass structure of the Triton structure_loss (docs/kernels.md §2): STRUCTURE_OPS_TRITON_PASS =
    "rows" (row panels, gradient in forward), "flash" (fused tiles, O(N) state) or "auto" (per shape)."""
    mode = os.environ.get("STRUCTURE_OPS_TRITON_PASS", "auto") or "auto"
    if mode not in TRITON_PASSES:
        raise ValueError(f"STRUCTURE_OPS_TRITON_PASS must be one of {list(TRITON_PASSES)}, got {mode!r}")
    return mode


def check_name(backend: str) -> None:
    """ValueError unless ``backend`` is "auto" or a known backend name."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


def reasons(
    backend: str, op: str, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...], cuda_index: int | None = None
) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of these device types and dtypes; [] means it can.
    ``cuda_index``: the CUDA tensors' device (None: the current one), for the cuda backend's architecture check."""
    check_name(backend)
    on = set(devices)
    out: list[str] = []
    if backend == "reference":
        return out  # plain PyTorch: any device, any floating dtype
    if backend == "cpu":
        if on != {"cpu"}:
            out.append(f"needs CPU tensors, got device(s) {sorted(on)}")
        if any(d not in _COMPILED_DTYPES for d in dtypes):
            out.append(f"supports {[str(d) for d in _COMPILED_DTYPES]}")
        err = extension_error("_C")
        if err:
            out.append(err)
        return out
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            out.append("triton is not installed")
        interpreted = on == {"cpu"} and os.environ.get("TRITON_INTERPRET", "0") == "1"
        if on != {"cuda"} and not interpreted:
            out.append(f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device(s) {sorted(on)}")
        if any(d not in TRITON_DTYPES for d in dtypes):
            out.append(f"supports {[str(d) for d in TRITON_DTYPES]}")
        if not out:  # only now import triton: the checks above are free
            err = triton_error()
            if err:
                out.append(err)
        return out
    # cuda
    if on != {"cuda"}:
        out.append(f"needs CUDA tensors, got device(s) {sorted(on)}")
    if torch.version.cuda is None:
        out.append("torch was built without CUDA")
    err = extension_error("_C_cuda")
    if err:
        out.append(err)
    if not out:  # only now ask the GPU: the checks above are free
        why = cuda_arch_reason(cuda_index)
        if why:
            out.append(why)
    return out


_CAPABILITIES: dict[int, tuple[int, int]] = {}


def cuda_capability(index: int | None = None) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (None: the current device), cached per device."""
    if index is None:
        index = torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITIES[index]


def cuda_arch_reason(index: int | None = None) -> str | None:
    """Why the CUDA build cannot run on device ``index``: e.g. "structure_ops._C_cuda was built for sm_90a,
    this GPU is sm_100 ..."; None when the build's targets run on it, or when they are unknown (then the
    kernels' own "no kernel image" error is the report)."""
    from ._build import arch_mismatch

    targets = cuda_targets()
    if not targets or not torch.cuda.is_available():
        return None
    return arch_mismatch(targets, cuda_capability(index))


def describe(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in tensors)


def _signature(tensors) -> tuple[tuple[str, ...], tuple[torch.dtype, ...]]:
    return tuple(sorted({t.device.type for t in tensors})), tuple({t.dtype: None for t in tensors})


def _cuda_index(tensors) -> int | None:
    return next((t.device.index for t in tensors if t.device.type == "cuda"), None)


@torch.compiler.assume_constant_result
def _select(
    op: str, backend: str, devices: tuple[str, ...], dtypes: tuple[torch.dtype, ...], cuda_index: int | None = None
) -> str:
    """The chosen backend's name, or "!" + the explanation. Evaluated once per signature under
    torch.compile (so the registry's imports, environment lookups and device queries never enter a graph)."""
    requested = backend
    if backend == "auto":
        backend = os.environ.get("STRUCTURE_OPS_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in AUTO_ORDER:
            if name == "triton" and "cuda" not in devices:
                continue  # the interpreter is for tests: CPU tensors reach Triton only when asked for by name
            if not reasons(name, op, devices, dtypes, cuda_index):
                return name
    if backend not in BACKENDS:
        via = " (from STRUCTURE_OPS_BACKEND)" if requested == "auto" else ""
        return f"!backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}{via}"
    if not reasons(backend, op, devices, dtypes, cuda_index):
        return backend
    lines = [f"backend={backend!r}" + (" (from STRUCTURE_OPS_BACKEND)" if requested == "auto" else "") + " cannot run them:"]
    for name in BACKENDS:
        r = reasons(name, op, devices, dtypes, cuda_index)
        lines.append(f"  {name}: " + ("available" if not r else "; ".join(r)))
    return "!" + "\n".join(lines)


def select(op: str, backend: str, tensors) -> str:
    """Name of the backend that runs ``op`` on ``tensors``; RuntimeError listing every backend if the
    requested one cannot."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    devices, dtypes = _signature(tensors)
    name = _select(op, backend, devices, dtypes, _cuda_index(tensors))
    if name.startswith("!"):
        raise RuntimeError(f"{op}: inputs [{describe(tensors)}]: {name[1:]}")
    return name


def availability(op: str, tensors) -> dict[str, list[str]]:
    """{backend: reasons} for ``op`` on ``tensors`` (used by ``python -m structure_ops.info``)."""
    devices, dtypes = _signature(tensors)
    return {name: reasons(name, op, devices, dtypes, _cuda_index(tensors)) for name in BACKENDS}
