"""The autotune layer shared by the Triton kernels (structure_ops/_triton/_common.py: TuneSpace, config_grid,
autotune_key, the STRUCTURE_OPS_AUTOTUNE* knobs). No kernel runs here: the benchmark path is driven with a fake
timer (the real one needs a GPU), so these tests check the selection logic itself."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from structure_ops._triton import _common as C  # noqa: E402

pytestmark = pytest.mark.triton


def _space(name="test.kernel", smem=None):
    cfgs = C.config_grid(BLOCK_M=(64, 128), BLOCK_N=(64, 128), num_warps=(4, 8), num_stages=(2, 3),
                         where=lambda m, w, s: not (m["BLOCK_M"] == 128 and m["BLOCK_N"] == 128 and w == 4))
    return C.TuneSpace(name, cfgs, heuristic=lambda key: cfgs[0] if key["n"] <= 1024 else cfgs[-1], smem=smem)


def test_config_grid_order_filter_and_names():
    sp = _space()
    assert len(sp.configs) == 2 * 2 * 2 * 2 - 2  # the two 128 × 128 / 4-warp configs filtered out
    assert sp.configs[0].meta == {"BLOCK_M": 64, "BLOCK_N": 64} and sp.configs[0].options == {"num_warps": 4, "num_stages": 2}
    assert sp.configs[1].options == {"num_warps": 4, "num_stages": 3}  # stages vary fastest
    assert sp.configs[-1].name == "BLOCK_M=128,BLOCK_N=128,w8,s3"
    assert len({c.name for c in sp.configs}) == len(sp.configs)
    assert C.autotune_spaces()["test.kernel"] is sp


def test_key_buckets_shapes_dtype_and_precision():
    a = C.autotune_key(n=3000, d=100, dtype=torch.bfloat16, sim=0)
    b = C.autotune_key(n=4096, d=128, dtype=torch.bfloat16, sim=0)
    assert a == b == {"n": 4096, "d": 128, "dtype": "bfloat16", "precision": "ieee", "sim": 0}
    assert C.autotune_key(n=4097, d=128, dtype=torch.bfloat16)["n"] == 8192
    assert C.autotune_key(n=8, dtype=torch.float32, precision="high")["precision"] == "tf32"
    assert C.autotune_key(n=8, dtype=torch.float32, precision="highest")["precision"] == "ieee"


def test_heuristic_when_not_benchmarking_and_forced_config(monkeypatch):
    sp = _space()
    C.clear_autotune_cache()
    calls = []
    monkeypatch.delenv(C.AUTOTUNE_FORCE_ENV, raising=False)
    # no CUDA device (or the interpreter, or STRUCTURE_OPS_AUTOTUNE=0): the heuristic, bench never called
    assert sp.choose({"n": 512}, bench=calls.append, device="cpu") is sp.configs[0]
    assert sp.choose({"n": 4096}, bench=calls.append, device="cpu") is sp.configs[-1]
    assert calls == []
    rec = C.autotune_cache()["test.kernel"]
    assert {r["source"] for r in rec.values()} == {"heuristic"} and len(rec) == 2
    for i in (0, 5, len(sp.configs) - 1):
        monkeypatch.setenv(C.AUTOTUNE_FORCE_ENV, f"other.kernel:0,test.kernel:{i}")
        assert sp.choose({"n": 512}, device="cpu") is sp.configs[i]
    monkeypatch.setenv(C.AUTOTUNE_FORCE_ENV, "*:2")
    assert sp.choose({"n": 512}, device="cpu") is sp.configs[2]
    monkeypatch.setenv(C.AUTOTUNE_FORCE_ENV, "test.kernel:99")
    with pytest.raises(ValueError, match="test.kernel has configs 0..13"):
        sp.choose({"n": 512}, device="cpu")
    monkeypatch.setenv(C.AUTOTUNE_FORCE_ENV, "test.kernel=1")
    with pytest.raises(ValueError, match="space:index"):
        sp.choose({"n": 512}, device="cpu")


def test_autotune_env_knob(monkeypatch):
    monkeypatch.setattr(C, "INTERPRET", False)
    monkeypatch.setenv(C.AUTOTUNE_ENV, "0")
    assert not C.autotune_enabled()
    monkeypatch.setenv(C.AUTOTUNE_ENV, "1")
    assert C.autotune_enabled()
    monkeypatch.setattr(C, "INTERPRET", True)
    assert not C.autotune_enabled()  # never under the interpreter


class _FakeKernel:
    def __init__(self, n_spills):
        self.n_spills = n_spills


def _fake_gpu(monkeypatch, timing):
    """Pretend to be on a CUDA device: do_bench returns ``timing(config)`` for the config the callable launches."""
    import triton.testing

    monkeypatch.setattr(C, "INTERPRET", False)
    monkeypatch.delenv(C.AUTOTUNE_FORCE_ENV, raising=False)
    monkeypatch.setenv(C.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(C, "_device_key", lambda device: "FakeGPU sm_90")
    monkeypatch.setattr(C, "device_limits", lambda device: dict(C.SM90_LIMITS, max_shared_mem=100_000))
    last = {}

    def do_bench(fn, warmup, rep):
        fn()
        return timing(last["cfg"])

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    return last


def test_benchmark_picks_fastest_skips_spills_errors_and_smem(monkeypatch, tmp_path):
    # smem estimate: 128-row tiles need 120 kB > the fake device's 100 kB: pruned before benchmarking
    sp = _space("test.bench", smem=lambda c, key: 120_000 if c["BLOCK_M"] == 128 else 50_000)
    C.clear_autotune_cache()
    target = next(c for c in sp.configs if c.name == "BLOCK_M=64,BLOCK_N=128,w8,s3")
    spiller = next(c for c in sp.configs if c.name == "BLOCK_M=64,BLOCK_N=64,w8,s2")
    broken = next(c for c in sp.configs if c.name == "BLOCK_M=64,BLOCK_N=64,w4,s3")
    last = _fake_gpu(monkeypatch, lambda c: 1.0 if c is target else 0.5 if c is spiller else 2.0)
    seen = []

    def bench(cfg):
        last["cfg"] = cfg
        seen.append(cfg)
        if cfg is broken:
            raise RuntimeError("out of resources: shared memory")
        return [_FakeKernel(8 if cfg is spiller else 0)]

    monkeypatch.setenv(C.AUTOTUNE_CACHE_ENV, str(tmp_path / "choices.json"))
    key = C.autotune_key(n=5000, d=64, dtype=torch.bfloat16)
    assert sp.choose(key, bench, device="cuda") is target
    assert all(c["BLOCK_M"] == 64 for c in seen)  # 128-row tiles never launched
    rec = next(iter(C.autotune_cache()["test.bench"].values()))
    assert rec["source"] == "benchmark" and rec["config"] == target.name and rec["device"] == "FakeGPU sm_90"
    assert len(rec["timings_ms"]) == 8 - 2 and rec["timings_ms"][target.name] == 1.0
    assert "spilled" in rec["skipped"][spiller.name] and "RuntimeError" in rec["skipped"][broken.name]
    # cached per key bucket: a nearby N reuses the choice without launching anything
    seen.clear()
    assert sp.choose(C.autotune_key(n=8000, d=64, dtype=torch.bfloat16), bench, device="cuda") is target
    assert seen == []
    # and the file carries it to a new process (simulated: the in-process cache cleared)
    on_disk = json.loads((tmp_path / "choices.json").read_text())
    assert on_disk["test.bench"][f"FakeGPU sm_90|{C.key_string(key)}"]["config"] == target.name
    C.clear_autotune_cache()
    assert sp.choose(key, bench, device="cuda") is target and seen == []
    # a different dtype is another key: benchmarked again
    sp.choose(C.autotune_key(n=5000, d=64, dtype=torch.float16), bench, device="cuda")
    assert seen


def test_benchmark_with_no_runnable_candidate_is_an_error(monkeypatch):
    sp = _space("test.none")
    C.clear_autotune_cache()
    _fake_gpu(monkeypatch, lambda c: 1.0)

    def bench(cfg):
        raise RuntimeError("nope")

    with pytest.raises(RuntimeError, match="test.none: no candidate ran"):
        sp.choose({"n": 1}, bench, device="cuda")


def test_allowed_prunes_per_key_and_aot_entries_are_the_candidates():
    # ``allowed`` removes configs per key (e.g. tiles that spill only for fp32); space_aot_entries emits exactly the
    # candidates of each variant's key, every config when a variant has no key.
    cfgs = C.config_grid(BLOCK_M=(64, 128), num_warps=(4, 8))
    sp = C.TuneSpace("test.allowed", cfgs, heuristic=lambda key: cfgs[0],
                     allowed=lambda c, key: key["dtype"] != "float32" or c["BLOCK_M"] == 64)  # fmt: skip
    assert len(sp.candidates({"dtype": "bfloat16"})) == 4 and len(sp.candidates({"dtype": "float32"})) == 2

    class K:
        arg_names = ["x_ptr", "n", "FLAG", "BLOCK_M"]

    sig = lambda k, ptr, cst: {a: "constexpr" if a in cst else ptr if a.endswith("_ptr") else "i32" for a in k.arg_names}  # noqa: E731
    variants = [("*bf16", {"FLAG": 1, "UNUSED": 3}, {"dtype": "bfloat16"}), ("*fp32", {"FLAG": 0}, {"dtype": "float32"}),
                ("*fp16", {"FLAG": 0})]  # fmt: skip
    entries = C.space_aot_entries(sp, K, variants, sig)
    assert len(entries) == 4 + 2 + 4
    assert all(e[2]["BLOCK_M"] == 64 for e in entries if e[1]["x_ptr"] == "*fp32")
    assert entries[0][2] == {"FLAG": 1, "BLOCK_M": 64} and entries[0][3] == {"num_warps": 4, "num_stages": 2}
    assert entries[0][1] == {"x_ptr": "*bf16", "n": "i32", "FLAG": "constexpr", "BLOCK_M": "constexpr"}
