"""The op boundary: torch.library schemas, fake (meta) kernels and autograd for the compiled backends.

Schemas live here, in Python, so they exist whether or not an extension was built; the C++ CPU kernels
(structure_ops._C) and CUDA kernels (structure_ops._C_cuda) register implementations for them under
``TORCH_LIBRARY_IMPL(structure_ops, CPU/CUDA, m)`` when they are imported.

Ops (all inputs already normalized/centered by structure_ops.functional):

  structure_fwd(xh, zh, levels, temperature, weighting, margin, similarity, gamma, divergence, eps,
                grad_x, grad_z) -> (loss, grad_x, grad_z)
      R_S and, when asked, ∂R_S/∂X̂ and ∂R_S/∂Ẑ computed in the same pass (docs/kernels.md §2a). Backward
      scales the saved gradients by grad_output, which is exact because the loss is a scalar.
  structure_rows_fwd(xh, zh, row_begin, row_end, temperature, similarity, gamma, divergence, eps,
                     grad_x, grad_z) -> (partial, grad_x, grad_z)
      Level 1 over the rows [row_begin, row_end) only: partial = (1/N) Σ_{i in range} ℓ_i (no margin) and
      its gradient w.r.t. the full X̂, Ẑ; one torch.distributed rank's shard (structure_ops.distributed).
  clip_fwd(image, text, logit_scale) -> (loss, lse_row, lse_col)
  clip_bwd(grad, image, text, logit_scale, lse_row, lse_col) -> (grad_image, grad_text, grad_logit_scale)
  knn(a, k) -> indices (N, k) int64

The Triton backend has its own ops with the same schemas (``triton_structure_fwd`` adds the level-1 pass
structure ``mode`` = "auto" | "rows" | "flash"), implemented in structure_ops/_triton/ops.py, so a CUDA
build of the C++ extension and the Triton kernels can both be present and be chosen per call.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import warnings

import torch

log = logging.getLogger("structure_ops")

_lib = torch.library.Library("structure_ops", "DEF")  # noqa: TOR901 - the library must outlive the module
_lib.define(
    "structure_fwd(Tensor xh, Tensor zh, int levels, float temperature, int weighting, float margin, "
    "int similarity, float gamma, int divergence, float eps, bool grad_x, bool grad_z) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "structure_rows_fwd(Tensor xh, Tensor zh, int row_begin, int row_end, float temperature, int similarity, "
    "float gamma, int divergence, float eps, bool grad_x, bool grad_z) -> (Tensor, Tensor, Tensor)"
)
_lib.define("clip_fwd(Tensor image, Tensor text, Tensor logit_scale) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "clip_bwd(Tensor grad, Tensor image, Tensor text, Tensor logit_scale, Tensor lse_row, Tensor lse_col) "
    "-> (Tensor, Tensor, Tensor)"
)
_lib.define("knn(Tensor a, int k) -> Tensor")
_lib.define(
    "triton_structure_fwd(Tensor xh, Tensor zh, int levels, float temperature, int weighting, float margin, "
    "int similarity, float gamma, int divergence, float eps, str mode, bool grad_x, bool grad_z) -> (Tensor, Tensor, Tensor)"
)
_lib.define("triton_clip_fwd(Tensor image, Tensor text, Tensor logit_scale) -> (Tensor, Tensor, Tensor)")
_lib.define(
    "triton_clip_bwd(Tensor grad, Tensor image, Tensor text, Tensor logit_scale, Tensor lse_row, Tensor lse_col) "
    "-> (Tensor, Tensor, Tensor)"
)
_lib.define("triton_knn(Tensor a, int k) -> Tensor")


def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype of per-row statistics: fp64 for fp64 inputs, fp32 otherwise (fp32 math for half types)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("structure_ops::structure_fwd")
def _structure_fwd_fake(xh, zh, levels, temperature, weighting, margin, similarity, gamma, divergence, eps, grad_x, grad_z):
    # The kernels return contiguous gradients whatever the input strides: new_empty, not empty_like.
    gx = xh.new_empty(xh.shape) if grad_x else xh.new_empty((0,))
    gz = zh.new_empty(zh.shape) if grad_z else zh.new_empty((0,))
    return xh.new_empty(()), gx, gz


@torch.library.register_fake("structure_ops::structure_rows_fwd")
def _structure_rows_fwd_fake(xh, zh, row_begin, row_end, temperature, similarity, gamma, divergence, eps, grad_x, grad_z):
    return _structure_fwd_fake(xh, zh, 1, temperature, 0, 0.0, similarity, gamma, divergence, eps, grad_x, grad_z)


@torch.library.register_fake("structure_ops::clip_fwd")
def _clip_fwd_fake(image, text, logit_scale):
    n = image.shape[0]
    return image.new_empty(()), image.new_empty((n,), dtype=_stat_dtype(image)), image.new_empty((n,), dtype=_stat_dtype(image))


@torch.library.register_fake("structure_ops::clip_bwd")
def _clip_bwd_fake(grad, image, text, logit_scale, lse_row, lse_col):
    return image.new_empty(image.shape), text.new_empty(text.shape), logit_scale.new_empty(logit_scale.shape)


@torch.library.register_fake("structure_ops::knn")
def _knn_fake(a, k):
    return a.new_empty((a.shape[0], k), dtype=torch.long)


@torch.library.register_fake("structure_ops::triton_structure_fwd")
def _triton_structure_fwd_fake(xh, zh, levels, temperature, weighting, margin, similarity, gamma, divergence, eps,
                               mode, grad_x, grad_z):
    return _structure_fwd_fake(xh, zh, levels, temperature, weighting, margin, similarity, gamma, divergence, eps,
                               grad_x, grad_z)


torch.library.register_fake("structure_ops::triton_clip_fwd", _clip_fwd_fake)
torch.library.register_fake("structure_ops::triton_clip_bwd", _clip_bwd_fake)
torch.library.register_fake("structure_ops::triton_knn", _knn_fake)


# ---------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------
def _structure_setup(ctx, inputs, output):
    # Shared by structure_fwd and structure_rows_fwd: both end in (..., grad_x, grad_z).
    _, gx, gz = output
    ctx.want = (inputs[-2], inputs[-1])
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(gx, gz)


def _no_double_backward(op: str) -> None:
    # The saved gradients are constants to autograd: a second derivative through them would be
    # silently zero, so refuse create_graph=True instead.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported by the compiled backends; "
            "use backend='reference' for higher-order gradients"
        )


def _structure_backward(ctx, grad_loss, _grad_gx, _grad_gz):
    _no_double_backward("structure_loss")
    gx, gz = ctx.saved_tensors
    want_x, want_z = ctx.want
    if (ctx.needs_input_grad[0] and not want_x) or (ctx.needs_input_grad[1] and not want_z):
        raise RuntimeError(
            "structure_fwd/structure_rows_fwd was called with grad_x/grad_z=False for an input that requires grad; "
            "call structure_ops.structure_loss, which sets these flags"
        )
    dx = grad_loss.to(gx.dtype) * gx if want_x else None
    dz = grad_loss.to(gz.dtype) * gz if want_z else None
    return (dx, dz) + (None,) * (ctx.n_inputs - 2)


for _op in ("structure_fwd", "structure_rows_fwd", "triton_structure_fwd"):
    torch.library.register_autograd(f"structure_ops::{_op}", _structure_backward, setup_context=_structure_setup)


def _clip_setup(ctx, inputs, output):
    image, text, logit_scale = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(image, text, logit_scale, lse_row, lse_col)


def _clip_backward_with(bwd_op: str):
    def backward(ctx, grad_loss, _grad_r, _grad_c):
        _no_double_backward("clip_loss")
        image, text, logit_scale, lse_row, lse_col = ctx.saved_tensors
        return getattr(torch.ops.structure_ops, bwd_op)(grad_loss, image, text, logit_scale, lse_row, lse_col)

    return backward


torch.library.register_autograd("structure_ops::clip_fwd", _clip_backward_with("clip_bwd"), setup_context=_clip_setup)
torch.library.register_autograd(
    "structure_ops::triton_clip_fwd", _clip_backward_with("triton_clip_bwd"), setup_context=_clip_setup
)


# ---------------------------------------------------------------------------------------------------
# SigLIP: value and gradient in one pass (csrc/common/siglip.h states the op contract)
#   siglip_fwd(image (M, d), text (N, d), logit_scale, logit_bias, row_offset, grad_image, grad_text)
#     -> (loss, grad_image, grad_text, grad_logit_scale, grad_logit_bias)
# Positives at (i, row_offset + i), loss normalized by N: M = N, row_offset = 0 is the single-process
# loss; a row shard gives its part of the global loss (structure_ops.distributed). The gradients are
# those of the loss (grad_output = 1); backward scales them. An empty tensor where a flag is False.
# ---------------------------------------------------------------------------------------------------
_SIGLIP_SCHEMA = (
    "(Tensor image, Tensor text, Tensor logit_scale, Tensor logit_bias, int row_offset, bool grad_image, "
    "bool grad_text) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define("siglip_fwd" + _SIGLIP_SCHEMA)
_lib.define("triton_siglip_fwd" + _SIGLIP_SCHEMA)


def _siglip_fwd_fake(image, text, logit_scale, logit_bias, row_offset, grad_image, grad_text):
    gi = image.new_empty(image.shape) if grad_image else image.new_empty((0,))
    gt = text.new_empty(text.shape) if grad_text else text.new_empty((0,))
    return image.new_empty(()), gi, gt, logit_scale.new_empty(logit_scale.shape), logit_bias.new_empty(logit_bias.shape)


def _siglip_setup(ctx, inputs, output):
    _, gi, gt, gs, gb = output
    ctx.want = (inputs[5], inputs[6])
    ctx.save_for_backward(gi, gt, gs, gb)


def _siglip_backward(ctx, grad_loss, *_unused):
    _no_double_backward("siglip_loss")
    gi, gt, gs, gb = ctx.saved_tensors
    want_i, want_t = ctx.want
    if (ctx.needs_input_grad[0] and not want_i) or (ctx.needs_input_grad[1] and not want_t):
        raise RuntimeError(
            "siglip_fwd was called with grad_image/grad_text=False for an input that requires grad; "
            "call structure_ops.siglip_loss, which sets these flags"
        )
    di = grad_loss.to(gi.dtype) * gi if want_i else None
    dt = grad_loss.to(gt.dtype) * gt if want_t else None
    ds = grad_loss.to(gs.dtype) * gs if ctx.needs_input_grad[2] else None
    db = grad_loss.to(gb.dtype) * gb if ctx.needs_input_grad[3] else None
    return di, dt, ds, db, None, None, None


for _op in ("siglip_fwd", "triton_siglip_fwd"):
    torch.library.register_fake(f"structure_ops::{_op}", _siglip_fwd_fake)
    torch.library.register_autograd(f"structure_ops::{_op}", _siglip_backward, setup_context=_siglip_setup)


# ---------------------------------------------------------------------------------------------------
# Compiled extensions: imported once, lazily; the reason is kept when one is missing.
# ---------------------------------------------------------------------------------------------------
_EXTENSIONS: dict[str, str | None] = {}


def extension_error(name: str) -> str | None:
    """Import ``structure_ops.<name>`` (registering its kernels); None if it loaded, else the reason."""
    if name not in _EXTENSIONS:
        try:
            importlib.import_module(f"structure_ops.{name}")
            _EXTENSIONS[name] = None
            _check_build_info()
        except ImportError as exc:
            _EXTENSIONS[name] = f"structure_ops.{name} is not built or failed to load ({exc})"
        except Exception as exc:  # noqa: BLE001 - e.g. a registration error: report it, never fail the import
            _EXTENSIONS[name] = f"structure_ops.{name} failed to load ({type(exc).__name__}: {exc})"
    return _EXTENSIONS[name]


def build_info() -> dict | None:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


_BUILD_CHECKED = False



def _check_build_info() -> None:
    global _BUILD_CHECKED
    if _BUILD_CHECKED:
        return
    _BUILD_CHECKED = True
    info = build_info()
    if info and info.get("torch") != torch.__version__:
        warnings.warn(
            f"structure_ops was built against torch {info.get('torch')} but torch {torch.__version__} is running; "
            "rebuild with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )


_CUDA_TARGETS: list = []


def cuda_targets() -> list[str] | None:
    """The CUDA targets the build of structure_ops._C_cuda contains ("sm_90a": machine code, "compute_90":
    PTX), from the build metadata; None when unknown (no metadata, or a build from before it was recorded)."""
    if not _CUDA_TARGETS:
        info = build_info() or {}
        targets = info.get("cuda_targets")
        _CUDA_TARGETS.append(list(targets) if isinstance(targets, list) and targets else None)
    return _CUDA_TARGETS[0]


ALLOW_MISSING_CUDA_ENV = "STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT"


def cuda_build_problem(cuda_available: bool, ext_error: str | None, capability=None, targets=None) -> str | None:
    """Why a machine with a GPU cannot run the CUDA backend it should have, or None.

    On a machine where torch sees a GPU, a missing or unloadable structure_ops._C_cuda, or a build whose
    targets do not run on the GPU (``capability``, ``targets`` as from ``cuda_targets()``), would turn every
    CUDA test into a skip: a false green. The test-suite fails at start-up on such a problem unless
    STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT=1. Without a GPU there is nothing to check (None).
    """
    if not cuda_available:
        return None
    if ext_error:
        return (f"a CUDA GPU is visible but {ext_error}; build it with `STRUCTURE_OPS_BUILD_CUDA=1 "
                "pip install --no-build-isolation -e .`")
    if capability is not None:
        from ._build import arch_mismatch

        return arch_mismatch(targets, capability)
    return None


# ---------------------------------------------------------------------------------------------------
# Triton implementations of the structure_ops::triton_* ops, registered here at import for CUDA tensors
# (and CPU tensors: the interpreter) as thin wrappers that import structure_ops._triton.ops, and with it
# triton, on their first call. So raw torch.ops.structure_ops.triton_* work on CUDA tensors right after
# `import structure_ops`, and importing the package still never imports triton. structure_ops/_triton/ops.py
# holds the host functions (TRITON_IMPLS) and registers nothing itself: a second registration of the same
# op and dispatch key raises on torch < 2.12.
# ---------------------------------------------------------------------------------------------------
TRITON_OPS = ("triton_structure_fwd", "triton_clip_fwd", "triton_clip_bwd", "triton_knn", "triton_siglip_fwd")


def _triton_kernel(op: str):
    def kernel(*args):
        from ._triton import ops as impls  # the first call imports triton and compiles nothing yet

        return impls.TRITON_IMPLS[op](*args)

    kernel.__name__ = kernel.__qualname__ = f"{op}_kernel"
    return kernel


for _op in TRITON_OPS:
    torch.library.register_kernel(f"structure_ops::{_op}", ("cuda", "cpu"), _triton_kernel(_op))


# Register every compiled implementation now, so torch.ops.structure_ops.* work on CPU and CUDA tensors
# right after `import structure_ops`. Loading an extension neither imports triton nor queries CUDA; a missing
# or broken build is reported by the registry and `python -m structure_ops.info`, not raised here.
extension_error("_C")
extension_error("_C_cuda")
