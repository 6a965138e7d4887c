"""Training of the two alignment heads with CLIP + λ·STRUCTURE (docs/spec.md §2, §4).

AdamW (β = 0.9, 0.95), cosine learning-rate schedule, grad-norm clipping per head, early stopping on the
validation loss (the full objective at λ, i.e. after warm-up, so that the λ ramp does not look like a
regression), optional LR range test, optional unimodal-only extra rows, seeded.

Defaults that also train with a few hundred pairs (the paper's 1 000 warm-up steps at batch 4 096 are ~3 % of
its COCO run; on a small set a fixed step count can outlast the whole run):

* the λ warm-up is a fraction of the run (``warmup_frac``, default 5 % of ``epochs × steps per epoch``) unless
  given in steps (``warmup``, the paper's form) or in epochs (``warmup_epochs``);
* the batch size defaults to :func:`auto_batch_size` of the training set, and an explicit one larger than the
  training set is lowered to it with a warning (it is never silently one step per epoch);
* only epochs that end at the full λ can be the restored "best" epoch or count towards the patience: the
  ramp can neither be picked nor stop the run; warnings say when the warm-up outlasts the run or the restored
  epoch is close to the initialisation;
* NaN/Inf inputs are refused and a diverging loss stops the run with an error (no NaN heads). A checkpoint holding the
heads, the optimizer, the scheduler, the loss state, both random generators, the early-stopping state and
the history is written atomically every ``checkpoint_every`` epochs; ``resume=True`` continues from it and
gives bit-for-bit the same heads as an uninterrupted run.

Under ``torchrun`` (torch.distributed initialized with world size K > 1) every rank takes its slice of
each global batch, the heads are wrapped in DDP and the losses are the sharded ones of
:mod:`structure_ops.distributed`; only rank 0 writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..modules import StructureClipLoss
from .features import Progress, atomic_write, check_finite
from .heads import build_head

DEFAULT_WARMUP_FRAC = 0.05  # of epochs × steps per epoch, when no warm-up is given
DEFAULT_MAX_BATCH = 4096  # the paper's batch size: the automatic one never exceeds it


class TrainingWarning(UserWarning):
    """A configuration or outcome that deserves attention (warm-up longer than the run, early best epoch, ...)."""


def auto_batch_size(n_train: int, cap: int = DEFAULT_MAX_BATCH) -> int:
    """The default batch size for ``n_train`` training pairs: a power of two near n/8, at least 32 (or n),
    at most ``cap``: around 8 steps per epoch on small sets (a full batch gives one optimizer step per epoch),
    the paper's 4 096 from ~32 000 pairs on."""
    if n_train <= 32:
        return max(2, n_train)
    return int(min(cap, max(32, 2 ** round(math.log2(n_train / 8)))))


@dataclass
class TrainConfig:
    head: str = "linear"  # "linear" | "mlp"
    dim: int = 512  # shared space
    rank: int = 64  # MLP head: rank of the residual branch
    lam: float = 10.0  # λ; 0 trains CLIP alone
    warmup: int | None = None  # λ warm-up in optimizer steps (the paper: 1000), or
    warmup_epochs: float | None = None  # ... in epochs, or
    warmup_frac: float | None = None  # ... as a fraction of the run; none given: DEFAULT_WARMUP_FRAC
    levels: int = 1
    weighting: str = "none"
    temperature: float = 0.05  # CLIP T (R_S uses it too unless structure_temperature is set)
    structure_temperature: float | None = None
    learnable_temperature: bool = False
    lr: float | None = None  # None: LR range test
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 1000
    batch_size: int | None = None  # None: auto_batch_size(training pairs); larger than the training set: lowered
    patience: int = 200  # epochs (at full λ) without a better validation loss
    grad_clip: float = 1.0
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"
    unimodal_only: bool = False  # R_S on the extra unimodal rows alone
    checkpoint_every: int = 10  # epochs; 0: only at the end
    loss: str = "clip"  # contrastive term: "clip" (InfoNCE) | "siglip" (pairwise sigmoid, learnable scale and bias)

    def __post_init__(self) -> None:
        for name in ("dim", "epochs", "batch_size", "patience", "rank"):
            v = getattr(self, name)
            if (v is not None or name != "batch_size") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        given = [k for k in ("warmup", "warmup_epochs", "warmup_frac") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give the λ warm-up one way, not {given}")
        if self.warmup is not None and (isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0):
            raise ValueError(f"warmup must be an int >= 0 (optimizer steps), got {self.warmup!r}")
        if self.warmup_epochs is not None and not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.warmup_frac is not None and not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (contrastive losses need pairs)")
        if self.lam < 0 or self.temperature <= 0 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"need lam >= 0, temperature > 0, lr > 0: got {self.lam}, {self.temperature}, {self.lr}")
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {self.loss!r}")
        self.betas = tuple(self.betas)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """The λ warm-up in optimizer steps for a run of ``epochs × steps_per_epoch`` steps."""
        if self.warmup is not None:
            return self.warmup
        if self.warmup_epochs is not None:
            return int(round(self.warmup_epochs * steps_per_epoch))
        frac = DEFAULT_WARMUP_FRAC if self.warmup_frac is None else self.warmup_frac
        return int(round(frac * self.epochs * steps_per_epoch))

    def describe_warmup(self) -> str:
        if self.warmup is not None:
            return f"{self.warmup} steps"
        if self.warmup_epochs is not None:
            return f"{self.warmup_epochs:g} epochs"
        return f"{DEFAULT_WARMUP_FRAC if self.warmup_frac is None else self.warmup_frac:g} of the run"


@dataclass
class TrainResult:
    image_head: nn.Module
    text_head: nn.Module
    history: list[dict]
    best_val: float
    best_epoch: int
    lr: float
    lr_curve: list[tuple[float, float]] = field(default_factory=list)
    stopped_early: bool = False
    batch_size: int = 0  # as used (after auto / lowering)
    warmup_steps: int = 0  # as used
    notes: list[str] = field(default_factory=list)  # the TrainingWarnings of the run


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dist():
    """(rank, world size, group or None)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    return 0, 1, None


def _objective(cfg: TrainConfig, world: int, warmup: int) -> nn.Module:
    if cfg.loss == "siglip":  # SigLIP's own init (s = 10, β = −10, learned); R_S keeps τ = the temperature option
        from .. import distributed as D
        from ..modules import StructureSigLipLoss

        kwargs = dict(
            lam=cfg.lam, warmup=warmup, structure_temperature=cfg.structure_temperature or cfg.temperature,
            structure_use_only_unimodal=cfg.unimodal_only, backend=cfg.backend, levels=cfg.levels,
            weighting=cfg.weighting,
        )  # fmt: skip
        return D.StructureSigLipLoss(**kwargs) if world > 1 else StructureSigLipLoss(**kwargs)
    kwargs = dict(
        lam=cfg.lam, warmup=warmup, temperature=cfg.temperature, learnable_temperature=cfg.learnable_temperature,
        structure_temperature=cfg.structure_temperature, structure_use_only_unimodal=cfg.unimodal_only,
        backend=cfg.backend, levels=cfg.levels, weighting=cfg.weighting,
    )
    if world > 1:
        from ..distributed import StructureClipLoss as ShardedStructureClipLoss

        return ShardedStructureClipLoss(**kwargs)
    return StructureClipLoss(**kwargs)


def _shard(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (uneven when world does not divide it)."""
    per, extra = divmod(len(rows), world)
    start = rank * per + min(rank, extra)
    return rows[start : start + per + (rank < extra)]


class Trainer:
    """Holds the data, the heads and the optimizer; ``fit()`` runs (or resumes) the training."""

    def __init__(self, cfg: TrainConfig, image_train: torch.Tensor, text_train: torch.Tensor,
                 image_val: torch.Tensor, text_val: torch.Tensor, *, image_extra: torch.Tensor | None = None,
                 text_extra: torch.Tensor | None = None, out_dir: str | os.PathLike | None = None,
                 progress: bool = True, provenance: dict | None = None) -> None:
        self.cfg, self.progress, self.provenance = cfg, progress, provenance or {}
        self.rank, self.world, self.group = _dist()
        self.device = resolve_device(cfg.device)
        for name, a, b in (("train", image_train, text_train), ("val", image_val, text_val)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
                raise ValueError(f"{name} features must be (n, d_image) and (n, d_text) with one n, got "
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
            if a.shape[0] < 2:
                raise ValueError(f"{name} needs at least 2 pairs, got {a.shape[0]}")
            check_finite({"image": a, "text": b}, f"{name} features")
        if cfg.unimodal_only and (image_extra is None or text_extra is None):
            raise ValueError("unimodal_only=True needs image_extra and text_extra features")
        put = lambda t: None if t is None else t.to(self.device, torch.float32)  # noqa: E731
        self.xi, self.xt, self.vi, self.vt = map(put, (image_train, text_train, image_val, text_val))
        self.ei, self.et = put(image_extra), put(text_extra)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        n = self.xi.shape[0]
        self.notes: list[str] = []
        if cfg.batch_size is None:
            self.batch_size = auto_batch_size(n)
        elif cfg.batch_size > n:
            self.batch_size = n
            self._note(f"batch size {cfg.batch_size} is larger than the {n} training pairs: using {n} "
                       f"(one optimizer step per epoch; the default batch size adapts to the training set)")
        else:
            self.batch_size = cfg.batch_size
        self.steps_per_epoch = len(self._batches(torch.Generator().manual_seed(0)))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = cfg.warmup_steps(self.steps_per_epoch)
        if cfg.lam > 0 and self.warmup_steps >= self.total_steps:
            self._note(f"the λ warm-up ({self.warmup_steps} steps) is not shorter than the run ({cfg.epochs} epochs × "
                       f"{self.steps_per_epoch} steps = {self.total_steps}): λ never reaches {cfg.lam:g}; use "
                       f"--warmup-frac (a fraction of the run) or fewer --warmup steps")

    def _note(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)
            if self.rank == 0:
                warnings.warn(msg, TrainingWarning, stacklevel=3)

    # -- building blocks ---------------------------------------------------------------------------------
    def _heads(self) -> tuple[nn.Module, nn.Module]:
        c = self.cfg
        kw = {"rank": c.rank} if c.head == "mlp" else {}
        return (build_head(c.head, self.xi.shape[1], c.dim, **kw).to(self.device),
                build_head(c.head, self.xt.shape[1], c.dim, **kw).to(self.device))

    def _batches(self, gen: torch.Generator) -> list[torch.Tensor]:
        n, bs = self.xi.shape[0], self.batch_size
        perm = torch.randperm(n, generator=gen)
        batches = [perm[s : s + bs] for s in range(0, n, bs)]
        if len(batches) > 1 and len(batches[-1]) < max(2, self.world):  # too small to contrast
            batches.pop()
        return batches

    def _extras(self, gen: torch.Generator, m: int):
        if self.ei is None:
            return None, None
        return (torch.randint(0, self.ei.shape[0], (m,), generator=gen),
                torch.randint(0, self.et.shape[0], (m,), generator=gen))

    def _loss(self, heads, objective, rows, extra_rows, step):
        hi, ht = heads
        xi, xt = self.xi[rows], self.xt[rows]
        kw = {}
        if extra_rows[0] is not None:
            ei, et = self.ei[extra_rows[0]], self.et[extra_rows[1]]
            kw = {"image_extra": (ei, hi(ei)), "text_extra": (et, ht(et))}
        return objective(hi(xi), ht(xt), xi, xt, step=step, **kw)

    @torch.no_grad()
    def validation_loss(self, heads, objective) -> float:
        for h in heads:
            h.eval()
        if self.world > 1:  # every rank holds the whole validation set: score it with the single-process loss
            single = _objective(self.cfg, 1, self.warmup_steps).to(self.device)
            single.load_state_dict(objective.state_dict())
            objective = single
        step = max(self.warmup_steps + 1, 1)  # full λ
        a, b = heads[0](self.vi), heads[1](self.vt)
        # Validation has no unimodal rows: with unimodal_only, R_S is measured on the validation pairs themselves.
        kw = {"image_extra": (self.vi, a), "text_extra": (self.vt, b)} if self.cfg.unimodal_only else {}
        out = objective(a, b, self.vi, self.vt, step=step, **kw)
        for h in heads:
            h.train()
        return float(out.loss)

    def lr_range_test(self, steps: int = 100, lr_min: float = 1e-7, lr_max: float = 10.0,
                      smoothing: float = 0.98) -> tuple[float, list[tuple[float, float]]]:
        """Leslie Smith's test (docs/spec.md §4): the LR at the steepest descent of the smoothed loss, divided by 5.

        Runs on throw-away heads under a forked RNG, so the training that follows is unaffected.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 7919)
            heads = self._heads()
            objective = _objective(self.cfg, 1, 0).to(self.device)
            params = [p for h in heads for p in h.parameters()] + list(objective.parameters())
            opt = torch.optim.AdamW(params, lr=lr_min, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
            gen = torch.Generator().manual_seed(self.cfg.seed + 7919)
            lrs = torch.logspace(math.log10(lr_min), math.log10(lr_max), steps).tolist()
            curve, avg, best = [], 0.0, math.inf
            batches: list[torch.Tensor] = []
            for t, lr in enumerate(lrs, 1):
                if not batches:  # equal-size batches only: the loss level depends on the batch size
                    batches = [b for b in self._batches(gen) if len(b) == self.batch_size]
                for g in opt.param_groups:
                    g["lr"] = lr
                loss = self._loss(heads, objective, batches.pop(), (None, None), step=t).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                avg = smoothing * avg + (1 - smoothing) * loss.item()
                smooth = avg / (1 - smoothing**t)
                if not math.isfinite(smooth) or smooth > 4 * best:
                    break
                best = min(best, smooth)
                curve.append((lr, smooth))
        # The first tenth of the curve is skipped: the smoothed loss is still warming up there (fastai does the same).
        skip = max(1, steps // 10)
        if len(curve) < skip + 3:
            raise RuntimeError(f"LR range test diverged after {len(curve)} steps; pass an explicit lr")
        slopes = [(curve[i + 1][1] - curve[i][1]) / math.log(curve[i + 1][0] / curve[i][0]) for i in range(skip, len(curve) - 1)]
        steepest = skip + min(range(len(slopes)), key=slopes.__getitem__)
        return curve[steepest][0] / 5.0, curve

    # -- checkpointing -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoint.pt"

    def _save(self, state: dict) -> None:
        if self.rank == 0 and self.checkpoint_path is not None:
            atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def _load(self) -> dict | None:
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return None
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:
            raise ValueError(f"cannot resume: checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or "config" not in state or "heads" not in state:
            raise ValueError(f"cannot resume: {path} is not a structure-ops training checkpoint")
        norm = lambda d: {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}  # noqa: E731
        saved, now = norm(state["config"]), norm(self.cfg.to_json())
        if saved != now:
            diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            raise ValueError(f"cannot resume from {path}: its config differs (saved, now): {diff}")
        old = state.get("provenance") or {}
        # (a checkpoint without provenance, written by an older version, is only checked on its config)
        changed = [k for k in sorted(set(old) | set(self.provenance)) if old and old.get(k) != self.provenance.get(k)]
        if changed:
            k = changed[0]
            raise ValueError(f"cannot resume from {path}: the {k.replace('_', ' ')} changed since it was written "
                             f"(checkpoint: {_short(old.get(k))}, now: {_short(self.provenance.get(k))}); "
                             f"train under another --name or without --resume")
        return state

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> TrainResult:
        """Train; ``stop_after_epoch`` ends this call early after that epoch (as a kill would, for tests)."""
        cfg = self.cfg
        state = self._load() if resume else None
        torch.manual_seed(cfg.seed)
        lr, lr_curve = (cfg.lr, []) if cfg.lr is not None else (None, [])
        if state is not None:
            lr, lr_curve = state["lr"], state["lr_curve"]
        elif lr is None:
            lr, lr_curve = self.lr_range_test()
        heads = self._heads()
        objective = _objective(cfg, self.world, self.warmup_steps).to(self.device)
        train_heads = heads
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_heads = tuple(DDP(h, device_ids=ids) for h in heads)
        params = [p for h in heads for p in h.parameters()] + list(objective.parameters())
        opt = torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        steps_per_epoch, total = self.steps_per_epoch, self.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        history, best_val, best_epoch, bad, best_state, epoch0 = [], math.inf, 0, 0, None, 0
        if state is not None:
            for h, s in zip(heads, state["heads"], strict=True):
                h.load_state_dict(s)
            objective.load_state_dict(state["objective"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"])
            history, best_val, best_epoch, bad = state["history"], state["best_val"], state["best_epoch"], state["bad"]
            best_state, epoch0 = state["best_state"], state["epoch"]
        step = epoch0 * steps_per_epoch
        stopped_early = False
        # A finished run (last epoch or early stop) resumes to the same result without training more.
        epochs = range(0) if state is not None and state["done"] else range(epoch0 + 1, cfg.epochs + 1)
        bar = Progress(cfg.epochs, f"train {cfg.head} λ={cfg.lam:g}", "epoch", self.progress and self.rank == 0,
                       initial=epoch0)
        for epoch in epochs:
            sums = {"loss": 0.0, "clip": 0.0, "structure": 0.0}
            batches = self._batches(gen)
            for rows in batches:
                step += 1
                extra = self._extras(gen, len(rows))
                if self.world > 1:
                    rows = _shard(rows, self.rank, self.world)
                    extra = tuple(None if e is None else _shard(e, self.rank, self.world) for e in extra)
                out = self._loss(train_heads, objective, rows, extra, step)
                if not torch.isfinite(out.loss.detach()):
                    raise ValueError(f"training diverged: the loss is {float(out.loss):g} at epoch {epoch}, step {step} "
                                     f"(lr {sched.get_last_lr()[0]:.3g}); pass a smaller --lr")
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if self.world > 1:  # a learnable temperature lives outside DDP: average its gradient as DDP would
                    import torch.distributed as dist

                    for p in objective.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= self.world
                for h in heads:
                    nn.utils.clip_grad_norm_(h.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                sums["loss"] += out.loss.item()
                sums["clip"] += out.clip.item()
                sums["structure"] += out.structure.item()
            val = self.validation_loss(heads, objective)
            rec = {"epoch": epoch, "step": step, "lr": sched.get_last_lr()[0], "lambda": objective.lambda_at(step),
                   **{f"train_{k}": v / len(batches) for k, v in sums.items()}, "val_loss": val}
            if not math.isfinite(val):
                raise ValueError(f"training diverged: the validation loss is {val:g} at epoch {epoch}; pass a smaller --lr")
            # Only an epoch that ends at the full λ can be the best one or use up patience: during the ramp the
            # heads are trained for a different objective than the one they are judged (and used) with.
            ramped = cfg.lam == 0 or objective.lambda_at(step) >= cfg.lam
            rec["full_lambda"] = ramped
            history.append(rec)
            if ramped and val < best_val:
                best_val, best_epoch, bad = val, epoch, 0
                best_state = [copy.deepcopy(h.state_dict()) for h in heads]
            elif ramped:
                bad += 1
            bar.update(1, loss=f"{rec['train_loss']:.3f}", val=f"{val:.3f}")
            done = epoch == cfg.epochs or bad >= cfg.patience
            stopped_early = bad >= cfg.patience
            interrupt = stop_after_epoch is not None and epoch >= stop_after_epoch
            if done or interrupt or (cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0):
                self._save({
                    "config": cfg.to_json(), "epoch": epoch, "lr": lr, "lr_curve": lr_curve,
                    "heads": [h.state_dict() for h in heads], "objective": objective.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
                    "history": history, "best_val": best_val, "best_epoch": best_epoch, "bad": bad,
                    "best_state": best_state, "done": done, "provenance": self.provenance,
                })
            if done or interrupt:
                break
        bar.close()
        if best_state is not None:
            for h, s in zip(heads, best_state, strict=True):
                h.load_state_dict(s)
        elif history:  # no epoch reached the full λ: the last one is the closest
            best_epoch, best_val = history[-1]["epoch"], history[-1]["val_loss"]
            self._note(f"no epoch reached the full λ = {cfg.lam:g} (warm-up {self.warmup_steps} steps, run {step} steps): "
                       f"kept the heads of the last epoch ({best_epoch}); shorten the warm-up")
        if history and best_state is not None:
            first = next(h["epoch"] for h in history if h.get("full_lambda", True))
            if len(history) >= 20 and best_epoch - first < max(2, len(history) // 20):
                where = "the end of the λ warm-up" if first > 1 else "the initialisation"
                self._note(f"the restored best epoch ({best_epoch}) is close to {where} (epoch {first} is the first "
                           f"at full λ; {len(history)} epochs run): the validation loss only rose after it; check --lr "
                           f"(default: LR range test), the warm-up, λ and the validation split")
        for h in heads:
            h.eval()
        if self.rank == 0 and self.out_dir is not None:
            atomic_write(self.out_dir / "history.json",
                         lambda tmp: Path(tmp).write_text(json.dumps({"lr": lr, "lr_curve": lr_curve, "history": history}, indent=1)))
        return TrainResult(heads[0], heads[1], history, best_val, best_epoch, lr, lr_curve, stopped_early,
                           self.batch_size, self.warmup_steps, list(self.notes))


def _short(v) -> str:
    if isinstance(v, dict) and "digest" in v:
        return f"features {str(v.get('digest'))[:12]}"
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


@torch.no_grad()
def embed(head: nn.Module, feats: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Aligned, L2-normalized embeddings (on the CPU, fp32)."""
    dev = next(head.parameters()).device
    head.eval()
    out = [head(feats[s : s + batch_size].to(dev, torch.float32)).cpu() for s in range(0, feats.shape[0], batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=1)
