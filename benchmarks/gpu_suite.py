"""GPU benchmark suite: correctness against the float64 oracle, then timings and peak memory, one command.

    python benchmarks/gpu_suite.py --out $OUT            # on the GPU machine (device tool), all ops
    python benchmarks/gpu_suite.py --smoke --out /tmp/s  # CPU smoke run (Triton interpreter, tiny sizes)

Providers (those that cannot run on the machine are recorded as skipped, with the reason):
  reference          eager structure_ops.reference (the paper's formulation, N × N matrices)
  compile_reference  torch.compile(reference) (inductor)
  chunked            plain PyTorch in row chunks with activation checkpointing (the obvious memory fix)
  triton_rows        backend "triton", level-1 pass (a): row panels, gradient in forward
  triton_flash       backend "triton", level-1 pass (b): fused tiles, O(N) state
  cuda               backend "cuda" (the C++/CUDA extension), when built
  inf_cl             (clip only) the Inf-CL package's memory-efficient contrastive loss, when installed
Timings: median of triton.testing.do_bench (CUDA events; warm-up first) or wall-clock in smoke mode; peak
memory: torch.cuda.max_memory_allocated minus the inputs. A point that runs out of memory is recorded as
"oom" and larger N of that provider are skipped. Before timing, every provider's value (and gradient norm)
is compared with the float64 oracle at a small N. Results: <out>/gpu_<op>.json (written atomically after
every point), printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _harness as H  # noqa: E402  (inputs and FLOP models shared with the CPU harness)

PROVIDERS = ("reference", "compile_reference", "chunked", "triton_rows", "triton_flash", "cuda", "inf_cl")


# ---------------------------------------------------------------------------------------------------
# the chunked-PyTorch baseline: row chunks of the level-1 core under activation checkpointing
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


def make_fn(op: str, provider: str, params: dict, n: int):
    import structure_ops as so

    if provider in ("reference", "compile_reference"):
        fn = H.make_fn(op, "reference", params, n)
        return torch.compile(fn) if provider == "compile_reference" else fn
    if provider == "chunked":
        if op != "structure" or int(params.get("levels", 1)) != 1:
            raise NotImplementedError("the chunked baseline covers structure level 1")
        return lambda x, z: chunked_structure_loss(x, z, float(params.get("temperature", 0.05)))
    if provider in ("triton_rows", "triton_flash", "cuda"):
        backend = "cuda" if provider == "cuda" else "triton"
        if provider.startswith("triton_"):
            os.environ["STRUCTURE_OPS_TRITON_PASS"] = provider.split("_", 1)[1]
            if op != "structure" and provider == "triton_flash":
                raise NotImplementedError("the pass choice applies to structure only")
        if op == "structure":
            kw = {"levels": int(params.get("levels", 1)), "temperature": float(params.get("temperature", 0.05))}
            return lambda x, z: so.structure_loss(x, z, backend=backend, **kw)
        if op == "clip":
            return lambda a, b, s: so.clip_loss(a, b, s, backend=backend)
        k = H.resolve_k(params, n)
        return lambda a: so.knn(a, k, backend=backend)
    if provider == "inf_cl":
        if op != "clip":
            raise NotImplementedError("inf_cl is a contrastive loss")
        from inf_cl import cal_inf_loss  # noqa: F401 - the peer, when installed

        def inf_cl(a, b, s):  # Inf-CL computes one direction per call: both directions = two calls
            import torch.nn.functional as F

            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            labels = torch.arange(a.shape[0], device=a.device)
            return 0.5 * (cal_inf_loss(a, b, labels=labels, scale=s) + cal_inf_loss(b, a, labels=labels, scale=s))

        return inf_cl
    raise ValueError(f"unknown provider {provider!r}")


def _inputs(op, n, dims, dtype, mode, device):
    ins = H.make_inputs(op, n, dims, dtype, mode=mode)
    return [t.detach().to(device).requires_grad_(t.requires_grad) for t in ins]


def _value_and_grad(fn, inputs, mode):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    if mode == "fwd+bwd":
        out.backward()
    grad = [t.grad.double().norm().item() for t in inputs if getattr(t, "grad", None) is not None]
    return float(out.detach().double()) if out.dim() == 0 else None, grad


def check(op, provider, params, dims, dtype, device, n=512) -> dict:
    """Relative error of the value and of each gradient norm against the float64 oracle on the same inputs."""
    mode = "fwd" if op == "knn" else "fwd+bwd"
    ins = _inputs(op, n, dims, dtype, mode, device)
    ref_ins = [t.detach().double().requires_grad_(t.requires_grad) for t in ins]
    if op == "knn":
        got = make_fn(op, provider, params, n)(*ins)
        want = H.make_fn(op, "reference", params, n)(*ref_ins)
        return {"index_agreement": float((got.cpu() == want.cpu()).float().mean())}
    v, g = _value_and_grad(make_fn(op, provider, params, n), ins, mode)
    rv, rg = _value_and_grad(H.make_fn(op, "reference", params, n), ref_ins, mode)
    return {"rel_err": abs(v - rv) / max(abs(rv), 1e-300),
            "grad_norm_rel_err": max((abs(a - b) / max(abs(b), 1e-300) for a, b in zip(g, rg, strict=True)), default=0.0)}


def time_point(fn, inputs, mode, smoke: bool) -> tuple[float, float | None]:
    step = H.make_step(fn, inputs, mode)
    if smoke or inputs[0].device.type != "cuda":
        t = time.perf_counter()
        step()
        return time.perf_counter() - t, None
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    return ms / 1e3, peak


def environment(device) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
           "matmul_precision": torch.get_float32_matmul_precision(), "date": time.strftime("%Y-%m-%d")}
    env["git"], env["dirty"] = H.git_info()
    return env


def _write(path, payload):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


SWEEPS = {  # op: (dims, default N list, modes)
    "structure": ({"d_x": 1024, "d_z": 512}, [4096, 8192, 16384, 32768, 65536, 131072, 262144], ("fwd", "fwd+bwd")),
    "clip": ({"d": 512}, [4096, 16384, 65536, 131072, 262144], ("fwd", "fwd+bwd")),
    "knn": ({"d": 1024}, [4096, 16384, 65536], ("fwd",)),
}


def run(op: str, out: str, ns, dtypes, providers, smoke: bool) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims, default_ns, modes = SWEEPS[op]
    if smoke:
        dims = {k: 16 for k in dims}
    ns = ns or default_ns
    params = {"levels": 1, "temperature": 0.05}
    path = os.path.join(out, f"gpu_{op}.json")
    payload = {"op": op, "environment": environment(device), "dims": dims, "checks": [], "records": []}
    for dtype in dtypes:
        for provider in providers:
            try:
                payload["checks"].append({"provider": provider, "dtype": dtype,
                                          **check(op, provider, params, dims, dtype, device, n=64 if smoke else 512)})
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
                            inputs = _inputs(op, n, dims, dtype, mode, device)
                            sec, peak = time_point(fn, inputs, mode, smoke)
                            flops = H.OPS[op].flops(n, dims, mode, params)
                            rec.update(median_s=sec, peak_bytes=peak, tflops=flops / sec / 1e12 if flops else None)
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
        peak = f"{r['peak_bytes'] / 2**20:9.0f} MiB" if r.get("peak_bytes") is not None else "        -    "
        tf = f"{r['tflops']:7.1f} TFLOP/s" if r.get("tflops") else ""
        print(f"{op:9s} {r['dtype']:9s} {r['mode']:8s} N={r['N']:<7d} {r['provider']:18s} {r['median_s'] * 1e3:10.2f} ms {peak} {tf}")
    else:
        print(f"{op:9s} {r['dtype']:9s} {r['mode']:8s} N={r['N']:<7d} {r['provider']:18s} "
              f"{'OOM' if r.get('oom') else r.get('skipped') or r.get('error')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--ops", default="structure,clip,knn")
    p.add_argument("--n", type=H.int_list, help="N values (default: the op's sweep)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--precision", default="high", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for fp32 (default high: TF32)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter): checks the script")
    a = p.parse_args(argv)
    torch.set_float32_matmul_precision(a.precision)
    os.makedirs(a.out, exist_ok=True)
    ns = a.n or ([32, 48] if a.smoke else None)
    for op in a.ops.split(","):
        print(f"wrote {run(op, a.out, ns, a.dtypes.split(','), a.providers.split(','), a.smoke)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
