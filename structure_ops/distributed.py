r"""Data-parallel (torch.distributed) STRUCTURE and CLIP losses: each rank passes its own rows.

Every function here returns, on every rank, the value of the single-process op on the concatenation of
all ranks' rows in rank order (the global batch of N = Σ_r n_r rows; shards may be uneven, even empty),
and backpropagates the gradient of that global loss. Without an initialized process group, or with
world size 1, each function *is* the single-process op.

How the work is split (rank r holds rows [start_r, start_r + n_r) of the global batch):

* ``structure_loss`` with ``levels=1``: the inputs are all-gathered (O(N·d)); row normalization and
  batch centering run on the gathered batch, so their statistics are global; then rank r computes only
  its own rows of the N × N problem, ``partial_r = (1/N) Σ_{i in shard r} Σ_j term(P_ij, Q_ij)``
  (a row softmax needs only its own row), against all N columns. The CPU and CUDA backends do this in
  their fused row-panel kernels (``structure_rows_fwd``: B × N panels, B ≤ n_r); the other backends in
  plain PyTorch on an n_r × N panel. R_S = relu(Σ_r partial_r − margin), summed with one scalar all-reduce.
* ``structure_loss`` with ``levels > 1``: Pˡ couples every row with every other one, so each rank
  computes the whole loss on the gathered batch (not sharded: same memory and time as one process)
  and takes 1/world of its gradient, which the gather's backward sums back.
* ``clip_loss``: rank r computes the image→text cross-entropy of its image rows against all gathered
  texts and the text→image cross-entropy of its text rows against all gathered images (open_clip's
  local-loss pattern, labels offset by start_r): two n_r × N logit panels per rank.

Gradient contract (``grad_mode``). Backward is collective: every rank must call it (DDP does). Let
L be the single-process loss of the global batch and K the world size.

* ``grad_mode="ddp"`` (default): the gradient reaching this rank's inputs is K · ∂L/∂(its rows), and a
  replicated tensor passed in (``logit_scale``) gets K · (this rank's share of ∂L/∂s). So every replicated
  parameter — head weights upstream of x/z, ``logit_scale`` — holds K × its rank share, and the *mean*
  over ranks, which is what DistributedDataParallel (and FSDP) computes, is exactly the single-process
  gradient. This is open_clip's convention; it also holds for uneven shards. Wrap every module that
  owns parameters feeding the loss in DDP (including a loss module with a learnable temperature).
* ``grad_mode="exact"``: this rank's inputs get exactly ∂L/∂(its rows); replicated parameters hold
  their rank share, so their gradients must be *summed* over ranks (all_reduce SUM) — under DDP,
  multiply the loss by K or use the "ddp" mode.

Inputs that are invalid on one rank raise the same error on every rank (one small all-gather of
shapes, dtypes, requires_grad and an options checksum precedes the work), instead of leaving the other
ranks blocked in a collective.
"""

from __future__ import annotations

import math
import numbers
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import _backends
from . import functional as F_
from . import modules as M
from . import reference as _reference

__all__ = [
    "GRAD_MODES",
    "world_size",
    "gather_with_grad",
    "structure_loss",
    "clip_loss",
    "StructureLoss",
    "ClipLoss",
    "StructureClipLoss",
    "siglip_loss",
    "SigLipLoss",
    "StructureSigLipLoss",
]

GRAD_MODES = ("ddp", "exact")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def world_size(group=None) -> int:
    """Number of ranks in ``group`` (the default group when None); 1 when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 1
    return dist.get_world_size(group)


def _grad_scale(grad_mode: str, k: int) -> float:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {list(GRAD_MODES)}, got {grad_mode!r}")
    return float(k) if grad_mode == "ddp" else 1.0


def _with_grad(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` exactly (s − s.detach() is exactly 0), with the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


# ---------------------------------------------------------------------------------------------------
# Metadata exchange: one small all-gather so that every rank sees every rank's shapes and errors.
# ---------------------------------------------------------------------------------------------------
def _meta_device(group, tensors) -> torch.device:
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    if dist.get_backend(group) == "nccl":  # NCCL only moves CUDA tensors
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_PER_TENSOR = 5  # rows, width, dtype, requires-grad, trailing-dims checksum


def _canonical(value):
    """Options in a form whose repr is the same on every rank for numerically equal values: 1, 1.0 and
    numpy.float64(1.0) all become 1.0 (bools and strings stay as they are)."""
    if isinstance(value, (tuple, list)):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Real):  # ints too: equal ints are equal floats
        return float(value)
    return repr(value)


def agree(op: str, group, values: dict, compare: tuple[str, ...] | None = None, why: str = "") -> None:
    """Raise the same ValueError on every rank unless every rank passes numerically equal ``values[k]`` for
    k in ``compare`` (default: all; a dict of numbers, one small all-gather; the others are only reported).
    Used before collectives whose occurrence depends on these values."""
    keys = list(values)
    mine = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=_meta_device(group, ()))
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    table = [r.tolist() for r in out]
    idx = [keys.index(k) for k in (compare if compare is not None else keys)]
    if any([r[i] for i in idx] != [table[0][i] for i in idx] for r in table):
        per_rank = {name: [r[i] for r in table] for i, name in enumerate(keys)}
        raise ValueError(
            f"{op}: {', '.join(keys[i] for i in idx)} must be equal on every rank{why}; per rank: {per_rank}"
        )


def _exchange(op: str, group, tensors: dict, error: Exception | None, options: tuple = ()) -> list[int]:
    """All-gather (error flag, options checksum, and per tensor: rows, width, dtype, requires-grad) and
    raise the same error on every rank if any rank's inputs are invalid or inconsistent with the others'.
    Returns the row counts of the first tensor on every rank."""
    vals = list(tensors.values())
    row = [int(error is not None), zlib.crc32(repr(_canonical(options)).encode())]
    for t in vals:
        ok = error is None and isinstance(t, torch.Tensor)
        row += [
            t.shape[0] if ok else -1,
            math.prod(t.shape[1:]) if ok else -1,  # width (the product of the trailing dims)
            _DTYPES.index(t.dtype) if ok and t.dtype in _DTYPES else -1,
            int(ok and t.requires_grad and torch.is_grad_enabled()),
            zlib.crc32(repr(tuple(t.shape[1:])).encode()) if ok else -1,  # the trailing dims themselves
        ]
    mine = torch.tensor(row, dtype=torch.int64, device=_meta_device(group, vals))
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    table = [r.tolist() for r in out]

    if error is not None:
        raise error
    bad = [r for r, m in enumerate(table) if m[0]]
    if bad:
        raise ValueError(f"{op}: rank(s) {bad} of the process group rejected their inputs (see the error raised there)")
    if len({m[1] for m in table}) > 1:
        raise ValueError(f"{op}: the options differ across ranks; every rank must pass the same options ({options})")
    for i, name in enumerate(tensors):
        rows, width, dtype, grad, trailing = ([m[2 + _PER_TENSOR * i + j] for m in table] for j in range(_PER_TENSOR))
        if len(set(width)) > 1:
            raise ValueError(f"{op}: {name} must have the same width on every rank, got widths {width} (rows {rows})")
        if len(set(trailing)) > 1:
            raise ValueError(
                f"{op}: {name} must have the same trailing dims (shape[1:]) on every rank; this rank has "
                f"{tuple(vals[i].shape[1:])}, and the ranks' shapes agree only in the product {width[0]}"
            )
        if len(set(dtype)) > 1:
            names = [str(_DTYPES[d]) if d >= 0 else "other" for d in dtype]
            raise TypeError(f"{op}: {name} must have the same dtype on every rank, got {names}")
        if len(set(grad)) > 1:
            raise ValueError(
                f"{op}: {name} requires grad on some ranks only ({[bool(g) for g in grad]}); backward is "
                "collective, so requires_grad and torch.is_grad_enabled() must agree on every rank"
            )
    sizes = [m[2] for m in table]
    if sum(sizes) < 2:
        raise ValueError(f"{op}: needs N >= 2 rows over all ranks, got per-rank row counts {sizes}")
    return sizes


# ---------------------------------------------------------------------------------------------------
# All-gather with gradient
# ---------------------------------------------------------------------------------------------------
class _Gather(torch.autograd.Function):
    """Forward: the rank-ordered concatenation of every rank's rows (uneven counts: pad to the largest,
    gather, unpad). Backward: the sum over ranks of the incoming gradients, sliced to this rank's rows."""

    @staticmethod
    def forward(ctx, t, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        m = max(sizes)
        padded = t.new_zeros((m, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad):
        # all_reduce + slice = reduce-scatter semantics on every backend (gloo has no uneven reduce-scatter).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def _gather(t, sizes, group):
    return _Gather.apply(t, sizes, dist.get_rank(group), group)


def gather_with_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather along dim 0 with gradient: returns every rank's ``t`` concatenated in rank order
    (row counts may differ between ranks; trailing dims and dtype must agree). Backward sums the
    gradients that all ranks pass for this rank's slice (torch.distributed.nn.functional.all_gather's
    semantics), so every rank must run it. World size 1: returns ``t`` itself."""
    if world_size(group) == 1:
        return t
    error = None
    if not isinstance(t, torch.Tensor) or t.dim() < 1:
        error = TypeError(f"gather_with_grad: t must be a tensor with at least one dim, got {t!r:.80}")
    sizes = _exchange("gather_with_grad", group, {"t": t}, error)
    return _gather(t, sizes, group)


# ---------------------------------------------------------------------------------------------------
# STRUCTURE
# ---------------------------------------------------------------------------------------------------
def _rows_logits(u: torch.Tensor, start: int, stop: int, similarity: str, temperature: float, gamma: float):
    """Rows [start, stop) of the similarity logits (reference.similarity's formulas, an n_r × N panel)."""
    gram = u[start:stop] @ u.T
    if similarity == "cosine":
        return gram / temperature
    return torch.exp(-gamma * _reference.rbf_sq_dist(u, gram, start))


def _rows_partial_torch(xh, zh, start, stop, *, temperature, similarity, gamma, divergence, eps):
    """(1/N) Σ_{i in [start, stop)} Σ_j term(P_ij, Q_ij) in plain PyTorch: reference.structure_core's level 1."""
    lx = torch.log_softmax(_rows_logits(xh, start, stop, similarity, temperature, gamma), dim=1)
    lz = torch.log_softmax(_rows_logits(zh, start, stop, similarity, temperature, gamma), dim=1)
    if divergence == "js":
        terms = _reference._js_terms_from_logs(lx, lz)
    else:
        terms = _reference._structure_terms(torch.exp(lx), torch.exp(lz), eps)
    return terms.sum() / xh.shape[0]


def structure_loss(
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    group=None,
    grad_mode: str = "ddp",
    levels: int = 1,
    temperature: float = 0.05,
    weighting: str = "none",
    margin: float = 0.0,
    centering: str = "mean",
    center_first: bool = False,
    similarity: str = "cosine",
    gamma: float = 1.0,
    divergence: str = "structure",
    eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """R_S of :func:`structure_ops.structure_loss` on the global batch; x, z are this rank's rows.

    Same options as the single-process op; ``group``: the process group (default: the world);
    ``grad_mode``: "ddp" or "exact" (module docstring). Levels 1 are row-sharded; levels > 1 are
    computed redundantly on every rank (not memory-sharded). Returns the same 0-dim value on every rank.
    """
    options = dict(
        levels=levels, temperature=temperature, weighting=weighting, margin=margin, centering=centering,
        center_first=center_first, similarity=similarity, gamma=gamma, divergence=divergence, eps=eps, backend=backend,
    )  # fmt: skip
    k = world_size(group)
    if k == 1:
        _grad_scale(grad_mode, 1)
        return F_.structure_loss(x, z, **options)
    # Everything that can fail on one rank (validation, the backend's availability) runs before the first
    # collective, and its outcome is exchanged: an error is raised on every rank, never left as a hang.
    error, name = None, None
    try:
        F_._check_pair("x", x, "z", z, min_rows=0, mixed_dtype=True)
        temperature, margin, gamma, eps, _, s_code, d_code = F_._structure_options(
            levels, temperature, weighting, margin, centering, center_first, similarity, gamma, divergence, eps
        )
        F_._check_range("structure_loss", _reference.compute_dtype(x.dtype, z.dtype), temperature, gamma, eps,
                        similarity, divergence)  # fmt: skip
        c = _grad_scale(grad_mode, k)
        wide = torch.promote_types(x.dtype, z.dtype)
        name = _backends.select("structure_loss", backend, (x.new_empty(0, dtype=wide),))
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    sizes = _exchange("structure_loss", group, {"x": x, "z": z}, error, (tuple(options.items()), grad_mode, name))
    xg, zg = F_._promote(_gather(x, sizes, group), _gather(z, sizes, group))

    if levels > 1:
        full = F_.structure_loss(xg, zg, **options)
        return _with_grad(full, full * (c / k))

    xh = _reference.prepare(xg, centering=centering, center_first=center_first)
    zh = _reference.prepare(zg, centering=centering, center_first=center_first)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    if name in ("cpu", "cuda"):  # both register the row-range op
        grad_on = torch.is_grad_enabled()
        partial, _, _ = torch.ops.structure_ops.structure_rows_fwd(
            xh, zh, start, stop, temperature, s_code, gamma, d_code, eps,
            grad_on and xh.requires_grad, grad_on and zh.requires_grad,
        )  # fmt: skip
    else:
        cdt = _reference.compute_dtype(xh.dtype)  # fp16/bf16 in fp32, as the single-process reference
        partial = _rows_partial_torch(
            xh.to(cdt), zh.to(cdt), start, stop, temperature=temperature, similarity=similarity, gamma=gamma,
            divergence=divergence, eps=eps,
        )  # fmt: skip
    total = partial.detach().clone()
    dist.all_reduce(total, group=group)
    shifted = total - margin
    # The hinge acts on the global D_1: its gate multiplies every rank's partial gradient.
    gate = (shifted > 0).to(partial.dtype)
    return _with_grad(torch.relu(shifted), partial * (gate * c)).to(xg.dtype)


# ---------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------
def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    group=None,
    normalize: bool = True,
    grad_mode: str = "ddp",
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric InfoNCE of :func:`structure_ops.clip_loss` on the global batch; image, text are this
    rank's rows (row i of each is a pair). ``logit_scale`` (the multiplier s) must be the same on every
    rank. The sharded path is plain PyTorch on two n_r × N logit panels; ``backend`` is used by the
    world-size-1 fallback only (and must be a valid name). Returns the same 0-dim value on every rank.
    """
    k = world_size(group)
    if k == 1:
        _grad_scale(grad_mode, 1)
        return F_.clip_loss(image, text, logit_scale, normalize=normalize, backend=backend)
    error, name, s_value = None, None, None
    try:
        F_._check_pair("image", image, "text", text, min_rows=0, same_width=True, mixed_dtype=True)
        image, text = F_._promote(image, text)
        scale = F_._clip_scale(logit_scale, image, normalize).reshape(())
        s_value = float(scale.detach())  # compared across ranks (the exchange syncs anyway)
        name = _backends.select("clip_loss", backend, (image,))
        c = _grad_scale(grad_mode, k)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    sizes = _exchange(
        "clip_loss", group, {"image": image, "text": text}, error, (normalize, grad_mode, name, ("logit_scale", s_value))
    )
    if normalize:  # row-local: normalize before gathering
        image = _reference.normalize_rows(image)
        text = _reference.normalize_rows(text)
    ig, tg = _gather(image, sizes, group), _gather(text, sizes, group)
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    labels = torch.arange(start, start + sizes[rank], device=image.device)
    out_dtype = image.dtype
    cdt = _reference.compute_dtype(out_dtype)  # fp16/bf16 logits in fp32
    image, text, ig, tg, scale = image.to(cdt), text.to(cdt), ig.to(cdt), tg.to(cdt), scale.to(cdt)
    ce_img = F.cross_entropy((scale * image) @ tg.T, labels, reduction="sum")
    ce_txt = F.cross_entropy((scale * text) @ ig.T, labels, reduction="sum")
    partial = 0.5 * (ce_img + ce_txt) / sum(sizes)
    total = partial.detach().clone()
    dist.all_reduce(total, group=group)
    return _with_grad(total, partial * c).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# Modules: the single-process modules with a sharded forward; same parameters, buffers and state_dict.
# ---------------------------------------------------------------------------------------------------
class StructureLoss(M.StructureLoss):
    """:class:`structure_ops.StructureLoss` over a process group: ``forward(x, z)`` with this rank's rows."""

    def __init__(self, *, process_group=None, grad_mode: str = "ddp", **options) -> None:
        super().__init__(**options)
        _grad_scale(grad_mode, 1)
        self.process_group, self.grad_mode = process_group, grad_mode

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return structure_loss(x, z, group=self.process_group, grad_mode=self.grad_mode, **self.options)


class ClipLoss(M.ClipLoss):
    """:class:`structure_ops.ClipLoss` over a process group: ``forward(image, text, logit_scale=None)``."""

    def __init__(self, temperature: float = 0.05, *, process_group=None, grad_mode: str = "ddp", **kwargs) -> None:
        super().__init__(temperature, **kwargs)
        _grad_scale(grad_mode, 1)
        self.process_group, self.grad_mode = process_group, grad_mode

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.logit_scale if logit_scale is None else logit_scale
        return clip_loss(
            image, text, scale, group=self.process_group, normalize=self.normalize, grad_mode=self.grad_mode,
            backend=self.backend,
        )  # fmt: skip


class StructureClipLoss(M.StructureClipLoss):
    """:class:`structure_ops.StructureClipLoss` over a process group; same arguments plus ``process_group``
    and ``grad_mode``, same :class:`StructureClipOutput`. ``forward`` takes this rank's rows (and its
    ``*_extra`` rows); R_S is invariant under a common row permutation, so where the extra rows land in
    the global batch does not change it. A learnable temperature is a replicated parameter: under the
    "ddp" contract wrap this module (or a model containing it) in DDP so its gradient is averaged."""

    def __init__(
        self,
        lam: float = 10.0,
        warmup: int = 1000,
        *,
        process_group=None,
        grad_mode: str = "ddp",
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(
            lam, warmup, temperature=temperature, learnable_temperature=learnable_temperature, backend=backend, **kwargs
        )
        # Same members, same parameter names (checkpoints are interchangeable), sharded forwards.
        self.process_group = process_group
        group = dict(process_group=process_group, grad_mode=grad_mode)
        self.clip = ClipLoss(temperature, learnable=learnable_temperature, backend=backend, **group)
        self.structure = StructureLoss(**group, **self.structure.options)

    def _check_schedule(self, step: int, lam_t: float) -> None:
        # λ_t decides whether the structure term (and its collectives) runs: a rank with a different
        # step (λ_t = 0 during warm-up on one rank only) or λ must raise everywhere, not desynchronize.
        if world_size(self.process_group) > 1:
            agree(
                type(self).__name__, self.process_group, {"lambda_t": lam_t, "lam": self.lam, "step": step},
                compare=("lambda_t", "lam"),
                why=" (λ_t decides whether the structure term's collectives run; pass the same step on every rank)",
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# SigLIP: rank r computes its image rows against all N gathered texts (only the texts are gathered: every
# pair (i, j) with i in shard r is in exactly one rank's panel), partial_r = (1/N) Σ_{i in r} Σ_j term_ij.
# The compiled backends run the fused op on the n_r × N panel (row_offset = start_r); the reference backend
# materializes it in plain PyTorch. Same gradient contract as clip_loss.
# ---------------------------------------------------------------------------------------------------
def _siglip_partial_torch(image, tg, scale, bias, start: int, n: int) -> torch.Tensor:
    """(1/N) Σ_{i, j} −log σ(y_ij z_ij) for the image rows [start, start + m) of the global batch (plain PyTorch)."""
    cdt = _reference.compute_dtype(image.dtype)
    image, tg, scale, bias = image.to(cdt), tg.to(cdt), scale.to(cdt), bias.to(cdt)
    rows = torch.arange(image.shape[0], device=image.device)[:, None] + start
    cols = torch.arange(n, device=image.device)[None, :]
    labels = 2.0 * (rows == cols).to(cdt) - 1.0
    return -F.logsigmoid(labels * (scale * image @ tg.T + bias)).sum() / n


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    group=None,
    normalize: bool = True,
    grad_mode: str = "ddp",
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP loss of :func:`structure_ops.siglip_loss` on the global batch (normalized by the global N);
    image, text are this rank's rows (row i of each is a pair); ``logit_scale`` and ``logit_bias`` must be
    the same on every rank. Each rank runs the fused op of ``backend`` on its n_r × N panel against the
    gathered texts. Returns the same 0-dim value on every rank; ``grad_mode`` as for :func:`clip_loss`.
    (open_clip's SigLipLoss instead returns a per-rank loss normalized by the local batch size: for equal
    shards its mean over ranks equals this value.)
    """
    k = world_size(group)
    if k == 1:
        _grad_scale(grad_mode, 1)
        return F_.siglip_loss(image, text, logit_scale, logit_bias, normalize=normalize, backend=backend)
    error, name, values = None, None, None
    try:
        F_._check_pair("image", image, "text", text, min_rows=0, same_width=True, mixed_dtype=True)
        image, text = F_._promote(image, text)
        scale = F_._clip_scale(logit_scale, image, normalize).reshape(())
        bias = F_._clip_scale(logit_bias, image, normalize, name="logit_bias").reshape(())
        values = (("logit_scale", float(scale.detach())), ("logit_bias", float(bias.detach())))  # compared across ranks
        name = F_._select("siglip_loss", backend, (image, text, scale, bias))
        c = _grad_scale(grad_mode, k)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    sizes = _exchange("siglip_loss", group, {"image": image, "text": text}, error, (normalize, grad_mode, name, values))
    if normalize:  # row-local: normalize before gathering
        image = _reference.normalize_rows(image)
        text = _reference.normalize_rows(text)
    tg = _gather(text, sizes, group)
    rank = dist.get_rank(group)
    start, n = sum(sizes[:rank]), sum(sizes)
    if name == "reference":
        partial = _siglip_partial_torch(image, tg, scale, bias, start, n).to(image.dtype)
    else:
        partial = F_._siglip_call(name, image, tg, scale, bias, start)
    total = partial.detach().clone()
    dist.all_reduce(total, group=group)
    return _with_grad(total, partial * c)


class SigLipLoss(M.SigLipLoss):
    """:class:`structure_ops.SigLipLoss` over a process group: ``forward(image, text, logit_scale=None,
    logit_bias=None)`` with this rank's rows. Its scale and bias are replicated parameters: under the "ddp"
    contract wrap it (or a model containing it) in DDP so their gradients are averaged."""

    def __init__(self, *args, process_group=None, grad_mode: str = "ddp", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _grad_scale(grad_mode, 1)
        self.process_group, self.grad_mode = process_group, grad_mode

    def forward(self, image, text, logit_scale=None, logit_bias=None) -> torch.Tensor:
        scale = self.logit_scale if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        return siglip_loss(
            image, text, scale, bias, group=self.process_group, normalize=self.normalize, grad_mode=self.grad_mode,
            backend=self.backend,
        )  # fmt: skip


class StructureSigLipLoss(M.StructureSigLipLoss):
    """:class:`structure_ops.StructureSigLipLoss` over a process group; same arguments plus ``process_group``
    and ``grad_mode`` (see :class:`StructureClipLoss` here for the extra rows and the replicated parameters)."""

    def __init__(
        self,
        lam: float = 10.0,
        warmup: int = 1000,
        *,
        process_group=None,
        grad_mode: str = "ddp",
        init_logit_scale: float = math.log(10.0),
        init_logit_bias: float = -10.0,
        learnable: bool = True,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__(
            lam, warmup, init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias, learnable=learnable,
            backend=backend, **kwargs,
        )  # fmt: skip
        group = dict(process_group=process_group, grad_mode=grad_mode)
        self.clip = SigLipLoss(init_logit_scale, init_logit_bias, learnable=learnable, backend=backend, **group)
        self.structure = StructureLoss(**group, **self.structure.options)

