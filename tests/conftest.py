"""Fixtures shared by the CPU test-suite (helpers live in helpers.py)."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The flag is read when a
# kernel is decorated, and also when triton builds its own library helpers (tl.sum, tl.max, ...), which
# happens as soon as anything imports triton (torch._dynamo does): set it before any other import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import cuda_setup_problem, require_cpu_extension  # noqa: E402


def pytest_configure(config):
    """On a machine with a GPU, a CUDA extension that is missing, does not load or was built for other GPUs
    fails the run here, before any test: otherwise every CUDA test would skip (a false green). Set
    STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT=1 to run without it (the CUDA tests then skip, with their reason)."""
    problem = cuda_setup_problem()
    if problem:
        raise pytest.UsageError(f"{problem}. (Set STRUCTURE_OPS_ALLOW_MISSING_CUDA_EXT=1 to run the tests without it.)")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No test sees a backend override or a panel budget set by the environment or by another test."""
    monkeypatch.delenv("STRUCTURE_OPS_BACKEND", raising=False)
    monkeypatch.delenv("STRUCTURE_OPS_CPU_PANEL_MB", raising=False)
    yield


@pytest.fixture
def cpu_ext():
    require_cpu_extension()


@pytest.fixture
def tiny_panels(monkeypatch):
    """A ~10 KB panel budget: the C++ kernels read it with getenv on every call, so every N × N pass
    runs as many row panels of 1–16 rows with a ragged last panel."""
    monkeypatch.setenv("STRUCTURE_OPS_CPU_PANEL_MB", "0.01")
    yield


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
