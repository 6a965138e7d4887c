"""Build facts and their use, checked without a GPU: the CUDA targets a build records, which GPUs they run on,
``backend="auto"`` moving on to Triton on a GPU the CUDA build lacks, the test-suite failing at start-up on a GPU
machine without a usable CUDA extension (no false green), and every op implementation registered at import.
GPU states are faked by monkeypatching (capability, build metadata, extension state)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import cuda_setup_problem

from structure_ops import _backends, _build, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------
# targets of a build and where they run
@pytest.mark.parametrize(
    ("arch_list", "expected"),
    [("8.0;9.0a", ["sm_80", "sm_90a"]), ("9.0a", ["sm_90a"]), ("8.0 8.6+PTX", ["sm_80", "sm_86", "compute_86"])],
)
def test_targets_match_torchs_gencode(monkeypatch, arch_list, expected):
    """What setup.py records equals what torch's build turns TORCH_CUDA_ARCH_LIST into (-gencode flags)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert sorted(_build.targets_from_gencode(cpp_extension._get_cuda_arch_flags())) == sorted(expected)
    assert sorted(_build.targets_from_arch_list(arch_list)) == sorted(expected)
    assert _build.targets_from_arch_list("Hopper") is None  # named lists are torch's to expand


@pytest.mark.parametrize(
    ("target", "capability", "runs"),
    [
        ("sm_90a", (9, 0), True), ("sm_90a", (10, 0), False), ("sm_90a", (8, 0), False),  # arch-specific: exact
        ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (9, 0), False),  # SASS: same major, minor ≥
        ("sm_86", (8, 0), False), ("compute_80", (10, 0), True), ("compute_90", (8, 9), False),  # PTX: any ≥
        ("compute_90a", (10, 0), False), ("sm_100f", (10, 3), True), ("sm_100f", (12, 0), False), ("bogus", (9, 0), False),
    ],
)
def test_runs_on(target, capability, runs):
    assert _build.runs_on(target, capability) is runs


def test_arch_mismatch_message():
    msg = _build.arch_mismatch(["sm_90a"], (10, 0))
    assert "built for sm_90a, this GPU is sm_100" in msg and "TORCH_CUDA_ARCH_LIST=10.0" in msg
    assert _build.arch_mismatch(["sm_80", "sm_90a"], (9, 0)) is None
    assert _build.arch_mismatch(None, (10, 0)) is None and _build.arch_mismatch([], (10, 0)) is None


def test_build_info_records_targets():
    info = _ops.build_info()
    assert info is not None and "cuda_targets" in info, "setup.py must record the CUDA targets of the build"
    if info["cuda_extension"]:
        assert info["cuda_targets"], info
    else:
        assert info["cuda_targets"] == [], info


# ---------------------------------------------------------------------------------------------------------------
# backend="auto" on a GPU the CUDA build does not cover
@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of settable capability, a loaded CUDA extension built for sm_90a, a loadable Triton."""
    state = {"capability": (10, 0), "targets": ["sm_90a"], "queries": 0}

    def capability(index=None):
        state["queries"] += 1
        return state["capability"]

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backends, "extension_error", lambda name: None)
    monkeypatch.setattr(_backends, "triton_error", lambda: None)
    monkeypatch.setattr(_backends, "cuda_targets", lambda: state["targets"])
    monkeypatch.setattr(_backends, "cuda_capability", capability)
    return state


SIG = ("structure_loss", ("cuda",), (torch.float32,))


def test_auto_moves_on_to_triton_when_the_cuda_build_lacks_the_gpu(fake_gpu):
    op, devices, dtypes = SIG
    why = _backends.reasons("cuda", op, devices, dtypes, 0)
    assert len(why) == 1 and "built for sm_90a, this GPU is sm_100" in why[0], why
    assert _backends._select(op, "auto", devices, dtypes, 0) == "triton"
    explicit = _backends._select(op, "cuda", devices, dtypes, 0)
    assert explicit.startswith("!") and "built for sm_90a, this GPU is sm_100" in explicit and "triton: available" in explicit


def test_auto_keeps_cuda_on_a_covered_gpu(fake_gpu):
    op, devices, dtypes = SIG
    fake_gpu["capability"] = (9, 0)
    assert _backends.reasons("cuda", op, devices, dtypes, 0) == []
    assert _backends._select(op, "auto", devices, dtypes, 0) == "cuda"
    fake_gpu["capability"], fake_gpu["targets"] = (10, 0), None  # targets unknown: no guess, cuda stays first
    assert _backends._select(op, "auto", devices, dtypes, 0) == "cuda"


def test_no_device_query_when_another_reason_already_rules_cuda_out(fake_gpu, monkeypatch):
    monkeypatch.setattr(_backends, "extension_error", lambda name: "structure_ops._C_cuda is not built")
    op, devices, dtypes = SIG
    assert _backends.reasons("cuda", op, devices, dtypes, 0) == ["structure_ops._C_cuda is not built"]
    assert _backends.reasons("cuda", op, ("cpu",), dtypes)[0].startswith("needs CUDA tensors")
    assert fake_gpu["queries"] == 0


# ---------------------------------------------------------------------------------------------------------------
# no false green: a GPU machine without a usable CUDA extension fails the test run at start-up
def test_cuda_build_problem():
    assert _ops.cuda_build_problem(False, "structure_ops._C_cuda is not built") is None  # no GPU: nothing to check
    msg = _ops.cuda_build_problem(True, "structure_ops._C_cuda is not built (No module named ...)")
    assert "a CUDA GPU is visible but structure_ops._C_cuda is not built" in msg and "STRUCTURE_OPS_BUILD_CUDA=1" in msg
    assert "this GPU is sm_100" in _ops.cuda_build_problem(True, None, (10, 0), ["sm_90a"])
    assert _ops.cuda_build_problem(True, None, (9, 0), ["sm_80", "sm_90a"]) is None


def test_cuda_setup_problem_decides_from_gpu_extension_and_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(_ops._EXTENSIONS, "_C_cuda", "structure_ops._C_cuda is not built or failed to load (faked)")
    assert "a CUDA GPU is visible" in cuda_setup_problem(environ={})
    assert cuda_setup_problem(environ={"STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT": "1"}) is None
    monkeypatch.setitem(_ops._EXTENSIONS, "_C_cuda", None)  # loads, but built for another GPU
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (10, 0))
    monkeypatch.setattr(_ops, "_CUDA_TARGETS", [["sm_90a"]])
    assert "built for sm_90a, this GPU is sm_100" in cuda_setup_problem(environ={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(_ops._EXTENSIONS, "_C_cuda", "not built")
    assert cuda_setup_problem(environ={}) is None  # no GPU: the CUDA tests skip, as they should


RUN_PYTEST_WITH_FAKE_GPU = textwrap.dedent(
    """
    import sys, torch
    torch.cuda.is_available = lambda: True  # a GPU machine ...
    import structure_ops
    structure_ops._ops._EXTENSIONS["_C_cuda"] = "structure_ops._C_cuda is not built (forced by the test)"  # ... without it
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--co", "tests/test_build.py::test_cuda_build_problem"]))
    """
)


def test_pytest_fails_at_start_on_a_gpu_machine_without_the_extension():
    env = {k: v for k, v in os.environ.items() if k != "STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT"}
    proc = subprocess.run([sys.executable, "-c", RUN_PYTEST_WITH_FAKE_GPU], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert "a CUDA GPU is visible but structure_ops._C_cuda is not built (forced by the test)" in out
    proc = subprocess.run([sys.executable, "-c", RUN_PYTEST_WITH_FAKE_GPU], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT": "1"}, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# every implementation registered at import; nothing registered twice
REGISTRATION = textwrap.dedent(
    """
    import inspect, json, sys
    import torch
    import torch.library as L
    import torch.nn.functional as F

    # torch < 2.12 refuses a second Python registration of an op and dispatch key (the GPU machine runs 2.11);
    # newer torch accepts it silently: make it refuse here too
    if "allow_override" in inspect.signature(L.Library.impl).parameters:
        _impl = L.Library.impl

        def strict(self, op_name, fn, dispatch_key="", *, with_keyset=False, allow_override=False):
            return _impl(self, op_name, fn, dispatch_key, with_keyset=with_keyset, allow_override=allow_override)

        L.Library.impl = strict

    import structure_ops
    from structure_ops import _ops

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    res = {
        "triton_cuda": {op: has(f"structure_ops::{op}", "CUDA") for op in _ops.TRITON_OPS},
        "triton_cpu": {op: has(f"structure_ops::{op}", "CPU") for op in _ops.TRITON_OPS},
        "knn_cuda": has("structure_ops::knn", "CUDA"),
        "C_cuda_loaded": _ops.extension_error("_C_cuda") is None,
        "C_cuda_tried": "_C_cuda" in _ops._EXTENSIONS,
        "triton_backend_imported": any(m.startswith("structure_ops._triton") for m in sys.modules),
    }
    import structure_ops._triton.ops as T  # must not register anything a second time
    res["impls"] = sorted(T.TRITON_IMPLS)
    a = F.normalize(torch.randn(24, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    res["raw_triton_knn"] = torch.equal(torch.ops.structure_ops.triton_knn(a, 3), structure_ops.reference.knn(a, 3))
    print(json.dumps(res))
    """
)


def test_every_implementation_registered_at_import_once():
    import json

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", REGISTRATION], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(res["triton_cuda"].values()), res  # raw torch.ops.structure_ops.triton_* on CUDA tensors, no API call first
    assert all(res["triton_cpu"].values()), res  # and on CPU tensors (the interpreter)
    assert not res["triton_backend_imported"], "importing structure_ops must not import the Triton backend"
    assert res["C_cuda_tried"] and res["knn_cuda"] == res["C_cuda_loaded"], res  # _C_cuda loaded at import when built
    assert res["impls"] == sorted(_ops.TRITON_OPS)
    assert res["raw_triton_knn"] is True


def test_triton_ops_listed_are_the_defined_ones():
    defined = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("structure_ops::triton_")}
    assert defined and set(_ops.TRITON_OPS) == defined, "a triton_* op without a registered implementation (or the reverse)"
