"""benchmarks/gpu_run.sh and benchmarks/gpu_suite.py: the GPU run's bookkeeping, the targets' schema, and the
suite's correctness checks against tolerances derived from the float64 hardware model.

The whole script runs in CI (`bash benchmarks/gpu_run.sh --cpu-smoke DIR`, .ci/run); here: its evidence when
every stage is killed by its time limit, the stage records, the test-result summaries, the targets schema, and
the suite's smoke run (marked ``triton``: on a GPU it runs at precision "high" on CUDA tensors, where the
tolerance must come from the tf32 model, not from fp32 arithmetic).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from emulation import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCH, "gpu_run.sh")


def _load(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    key = f"_test_benchmarks_{name}"
    if key not in sys.modules:  # registered before it runs: dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(key, os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


G = _load("_gpu_run")
EXPECTED_KEYS = [  # the issue's list, written out independently of the code under test
    "device", "structure_l1_n16384_speedup_vs_eager", "structure_l1_n16384_speedup_vs_compile", "structure_l1_max_n",
    "structure_l1_max_n_peak_extra_gib", "gemm_fraction_of_bf16_peak", "clip_n65536_speedup_vs_infcl",
]


def test_target_keys_are_the_issues():
    assert list(G.TARGET_KEYS) == EXPECTED_KEYS


def test_validate_targets():
    good = dict.fromkeys(EXPECTED_KEYS)
    good.update(device="NVIDIA H200", structure_l1_max_n=262144, gemm_fraction_of_bf16_peak=0.61)
    assert G.validate_targets(good) == []
    assert any("missing ['clip_n65536_speedup_vs_infcl']" in p for p in G.validate_targets({k: v for k, v in good.items() if k != "clip_n65536_speedup_vs_infcl"}))
    assert any("unexpected ['speedup']" in p for p in G.validate_targets({**good, "speedup": 2.0}))
    assert any("structure_l1_max_n must be" in p for p in G.validate_targets({**good, "structure_l1_max_n": "262144"}))
    assert any("must be a finite number" in p for p in G.validate_targets({**good, "gemm_fraction_of_bf16_peak": float("nan")}))
    assert any("must be a finite number" in p for p in G.validate_targets({**good, "structure_l1_max_n": True}))
    assert any("device must be" in p for p in G.validate_targets({**good, "device": None}))
    assert G.validate_targets([1, 2]) != []


def test_targets_file_is_written_at_once_with_the_schema(tmp_path):
    """The suite writes targets.json (exact keys, nulls) before measuring anything: a stage killed early still
    returns a valid file."""
    S = _load("gpu_suite")
    S.Targets(str(tmp_path), smoke=True, budget_s=0.0, compile_backend="aot_eager", seed=1)
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert list(targets) == EXPECTED_KEYS
    assert targets["device"].startswith("SMOKE")
    assert all(targets[k] is None for k in EXPECTED_KEYS[1:])
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["mode"] == "smoke" and bench["seed"] == 1
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "targets.json"]  # nothing else, no temporary files left


def test_summaries_of_test_results(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="2.0"><failure message="assert 1e-3 &lt; 2e-4">x</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu" time="0.0"><skipped message="needs a CUDA GPU"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu2" time="0.0"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    s = G.summarize_junit(str(xml))
    assert s["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 2}
    assert s["failures"] == [{"test": "tests.test_a::test_bad", "kind": "failure", "message": "assert 1e-3 < 2e-4"}]
    assert s["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert s["slowest"][0] == {"test": "tests.test_a::test_bad", "s": 2.0}
    assert G.summarize_junit(str(tmp_path / "missing.xml")) is None
    log = tmp_path / "tests.log"
    log.write_text(
        "tests/test_a.py::test_ok PASSED                 [ 25%]\n"
        "[gw1] [ 50%] FAILED tests/test_a.py::test_bad \n"
        "tests/test_b.py::test_gpu SKIPPED (needs a CUDA GPU)   [ 75%]\n"
        "tests/test_c.py::test_slow \n"  # killed here: no outcome
    )
    s = G.summarize_log(str(log))
    assert s["counts_from_log"] == {"PASSED": 1, "FAILED": 1, "SKIPPED": 1}
    assert s["failed_from_log"] == ["tests/test_a.py::test_bad"]
    assert s["last_test_seen"] == "tests/test_b.py::test_gpu"


def test_stage_records(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    G.record(str(out), str(work), "smoke", "bench", "running", 0, 150, "")
    data = json.loads((out / "stages.json").read_text())
    assert data["stages"]["bench"] == {"status": "running", "seconds": 0.0, "budget_s": 150.0} and data["ok"] is False
    (out / "targets.json").write_text(json.dumps({**dict.fromkeys(EXPECTED_KEYS), "device": "x", "extra": 1}))
    (out / "bench.log").write_text("line 1\nline 2\n")
    G.record(str(out), str(work), "smoke", "bench", "ok", 12.34, 150, "0")
    entry = json.loads((out / "stages.json").read_text())["stages"]["bench"]
    assert entry["status"] == "ok" and entry["seconds"] == 12.3 and entry["rc"] == 0
    assert entry["details"]["log_tail"] == ["line 1", "line 2"]
    assert any("unexpected ['extra']" in p for p in entry["details"]["targets_problems"])


@pytest.mark.skipif(shutil.which("flock") is None or shutil.which("timeout") is None, reason="needs flock(1) and timeout(1)")
def test_every_stage_killed_still_leaves_evidence(tmp_path):
    """All four stages over their time limit (the build waits on a lock this test holds, so nothing is built):
    the script still ends, records each stage as a timeout with its seconds, and keeps every log."""
    lock = tmp_path / "build.lock"
    out = tmp_path / "out"
    env = {**os.environ, "STRUCTURE_OPS_BUILD_LOCK": str(lock), "GPU_RUN_BUDGET_BUILD": "2", "GPU_RUN_BUDGET_LOAD": "1",
           "GPU_RUN_BUDGET_TESTS": "1", "GPU_RUN_BUDGET_BENCH": "1", "PYTHON": sys.executable}
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        proc = subprocess.run(["bash", SCRIPT, "--cpu-smoke", str(out)], capture_output=True, text=True, env=env, timeout=180)
        wall = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "stages.json").read_text())
    assert list(data["stages"]) == ["build", "load", "tests", "bench"]
    for name, entry in data["stages"].items():
        assert entry["status"] == "timeout" and entry["rc"] == 124, (name, entry)
        assert entry["budget_s"] <= 2 and entry["seconds"] < entry["budget_s"] + 10, (name, entry)
        assert 0.0 <= entry["cpu_s"] < 60, (name, entry)
        assert (out / f"{name}.log").exists()
    assert data["ok"] is False
    assert wall < 120


def test_usage():
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# the suite's smoke run: tolerances from the hardware model
def _expected_tolerances(provider: str, device: str, n: int, seed: int, dims: dict) -> tuple[float, float]:
    """(value, gradient) tolerances of the structure check, derived here from tests/emulation/hardware.py: the
    Triton kernels round fp32 operands to tf32 at precision "high" (on a GPU and in the interpreter); cuBLAS
    does the same on a GPU; CPU GEMMs multiply in fp32."""
    H = _load("_harness")
    S = _load("gpu_suite")
    fmt = "tf32" if (provider.startswith("triton") or device == "cuda") else "fp32"
    x, z = H.make_inputs("structure", n, dims, "float32", seed=seed, mode="fwd+bwd")
    from structure_ops import reference as R

    xh, zh = R.prepare(x.detach().double()), R.prepare(z.detach().double())
    exact = hardware.level1_emulated(xh, zh, "fp64", temperature=0.05)
    emu = hardware.level1_emulated(xh, zh, fmt, temperature=0.05)
    return (hardware.tolerance(hardware.rel_err(emu[0], exact[0]), 4.0, S.VALUE_FLOOR),
            hardware.tolerance(hardware.rel_err(emu[2], exact[2]), 4.0, S.GRAD_FLOOR))


@pytest.mark.triton
def test_gpu_suite_smoke(tmp_path):
    """benchmarks/gpu_suite.py end to end at tiny sizes at precision "high" (TF32 on a GPU), each provider's
    errors against the float64 oracle within the tolerance of its operand format (not fp32's)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or the Triton interpreter")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_suite.py"), "--smoke", "--out", str(tmp_path),
                           "--ops", "structure", "--providers", "reference,chunked,triton_rows,triton_flash",
                           "--dtypes", "float32", "--precision", "high", "--seed", "7"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_structure.json").read_text())
    assert data["environment"]["matmul_precision"] == "high" and data["seed"] == 7
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checks = {c["provider"]: c for c in data["checks"]}
    for p in ("chunked", "triton_rows", "triton_flash"):
        c = checks[p]
        assert "skipped" not in c, c
        tol, grad_tol = _expected_tolerances(p, device, c["N"], 7, data["dims"])
        assert c["rel_err"] <= tol, (p, c["rel_err"], tol)
        assert c["grad_rel_err"] <= grad_tol, (p, c["grad_rel_err"], grad_tol)
        assert c["ok"] is True, c
    assert any("median_s" in r and r["provider"] == "triton_rows" for r in data["records"])
    # the run records its Triton autotune choices (the heuristic's without a GPU, benchmarked with one)
    tuned = json.loads((tmp_path / "autotune.json").read_text())
    assert {r["source"] for r in tuned["structure_flash.loss"].values()} <= {"heuristic", "benchmark"}


def test_operand_formats():
    S = _load("gpu_suite")
    assert S.operand_format("float32", "cuda", "high", "cuda") == "tf32"
    assert S.operand_format("float32", "cuda", "high", "triton_flash") == "tf32"
    assert S.operand_format("float32", "cpu", "high", "triton_rows") == "tf32"  # explicit rounding, interpreter too
    assert S.operand_format("float32", "cpu", "high", "reference") == "fp32"
    assert S.operand_format("float32", "cuda", "highest", "triton_rows") == "fp32"
    assert S.operand_format("float32", "cuda", "high", "inf_cl") == "tf32_trunc"
    assert S.operand_format("bfloat16", "cuda", "high", "cuda") == "bf16"
    assert S.operand_format("float64", "cuda", "high", "cuda") == "fp64"
