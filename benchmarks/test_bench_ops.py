"""pytest-benchmark micro-benchmarks: every op × provider × mode at small N.

Collected only when benchmarks/ is named explicitly (the package's testpaths is tests/)::

    python -m pytest benchmarks/ --benchmark-only
    python -m pytest benchmarks/ --benchmark-only -k "structure and not compile"   # a subset

Each test first checks the provider against the float64 oracle on the same inputs (values for the
losses, neighbour-list overlap for kNN), then times one call (fwd) or forward + backward (fwd+bwd).
Set BENCH_N to change N (default 512).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402
import roofline  # noqa: E402

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

N = int(os.environ.get("BENCH_N", "512"))
DIMS = {"structure": {"d_x": 768, "d_z": 512}, "clip": {"d": 512}, "knn": {"d": 768}, "mutual_knn": {"d": 768}}
PARAMS = {
    "structure": {"levels": 1, "temperature": 0.05},
    "clip": {},
    "knn": {"k": "rice"},
    "mutual_knn": {"k": "rice"},
}
CASES = [
    pytest.param(op, provider, mode, id=f"{op}-{mode}-{provider}")
    for op in ("structure", "clip", "knn", "mutual_knn")
    for mode in H.OPS[op].modes
    for provider in H.PROVIDERS
]


def _cpu_backend_reason(op: str) -> str | None:
    from structure_ops import _backends

    name = {"structure": "structure_loss", "clip": "clip_loss"}.get(op, "knn")
    reasons = _backends.reasons("cpu", name, ("cpu",), (torch.float32,))
    return "; ".join(reasons) or None


def _check_against_oracle(op: str, out, inputs) -> None:
    """The provider's fp32 result vs the float64 reference on the same inputs."""
    from structure_ops import reference as R

    d64 = [t.detach().to(torch.float64) for t in inputs]
    params = PARAMS[op]
    if op == "structure":
        want = R.structure_loss(*d64, levels=params["levels"], temperature=params["temperature"])
    elif op == "clip":
        want = R.clip_loss(*d64)
    elif op == "mutual_knn":
        want = R.mutual_knn(*d64, H.resolve_k(params, N))
    else:
        k = H.resolve_k(params, N)
        want_idx = R.knn(torch.nn.functional.normalize(d64[0], dim=1), k)
        # fp32 rounding may swap near-ties: require almost the same neighbour sets
        overlap = (out[:, :, None] == want_idx[:, None, :]).any(dim=2).float().mean().item()
        assert out.shape == (N, k) and overlap > 0.98, overlap
        return
    got = float(out.detach())
    assert abs(got - float(want)) <= 1e-3 * abs(float(want)) + 1e-6, (got, float(want))


@pytest.mark.parametrize(("op", "provider", "mode"), CASES)
def test_op(benchmark, op: str, provider: str, mode: str) -> None:
    if provider == "cpu" and (why := _cpu_backend_reason(op)):
        pytest.skip(f"cpu backend unavailable: {why}")
    dims, params = DIMS[op], PARAMS[op]
    inputs = H.make_inputs(op, N, dims, "float32", seed=0, mode=mode)
    fn = H.make_fn(op, provider, params, N)
    step = H.make_step(fn, inputs, mode)
    out = step()  # compilation for compile_reference; correctness for all
    _check_against_oracle(op, out, inputs)
    flops = H.OPS[op].flops(N, dims, mode, params)
    benchmark.group = f"{op} {mode} N={N} " + " ".join(f"{k}={v}" for k, v in dims.items())
    benchmark.extra_info.update(op=op, provider=provider, mode=mode, N=N, dims=dims, flops=flops)
    # the kernel's roofline model (benchmarks/roofline.py): FLOPs incl. recomputation, exp/log ops, memory bytes
    model = roofline.annotate({"op": op, "provider": provider, "mode": mode, "N": N, "dims": dims,
                               "dtype": "float32", "params": params}, None)  # fmt: skip
    benchmark.extra_info.update({k: v for k, v in model.items() if k.startswith(("model_", "roofline_"))})
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["gflops_median"] = flops / benchmark.stats.stats.median / 1e9
