"""Helpers of benchmarks/gpu_run.sh: stage records, the load check, test-result summaries, the targets' schema.

    python benchmarks/_gpu_run.py record OUT_DIR WORK_DIR MODE STAGE STATUS SECONDS BUDGET RC [CPU_SECONDS]
    python benchmarks/_gpu_run.py load-check WORK_DIR MODE
    python benchmarks/_gpu_run.py validate-targets OUT_DIR/targets.json

``record`` rewrites OUT_DIR/stages.json atomically (a temporary file, then a rename) with the stage's status,
seconds, budget, exit code and details gathered from what the stage left (its log in OUT_DIR, its files in
WORK_DIR), so that a stage killed by its time limit still leaves evidence. Nothing here imports torch except
``load-check``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

# The keys of targets.json, exactly (numbers; null when not measured; "device" is a string).
TARGET_KEYS = (
    "device",
    "structure_l1_n16384_speedup_vs_eager",
    "structure_l1_n16384_speedup_vs_compile",
    "structure_l1_max_n",
    "structure_l1_max_n_peak_extra_gib",
    "gemm_fraction_of_bf16_peak",
    "clip_n65536_speedup_vs_infcl",
)
STAGES = ("build", "load", "tests", "bench")


def write_json(path: str, payload) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(path: str, lines: int = 40) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-lines:]]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------------
# test results
def summarize_junit(path: str, limit: int = 60) -> dict | None:
    """Counts, failed/errored test ids with their message, and skip reasons (counted) from a junit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    total_s = 0.0
    slowest = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        t = float(case.get("time") or 0.0)
        total_s += t
        slowest.append((t, name))
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            msg = (kinds[tag].get("message") or "").strip().splitlines()
            failures.append({"test": name, "kind": tag, "message": (msg[0] if msg else "")[:400]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    slowest.sort(reverse=True)
    return {"counts": counts, "failures": failures[:limit], "skip_reasons": skips,
            "test_seconds": round(total_s, 1), "slowest": [{"test": n, "s": round(t, 2)} for t, n in slowest[:15]]}


_VERBOSE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
_XDIST = re.compile(r"^\[gw\d+\]\s+\[\s*\d+%\]\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(\S+::\S+)")
_SUMMARY = re.compile(r"^(FAILED|ERROR)\s+(\S+::\S+)")


def summarize_log(path: str) -> dict:
    """What a (possibly killed) pytest -v run printed: counts by outcome and the failed ids seen so far."""
    counts: dict[str, int] = {}
    failed = []
    last = None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = _VERBOSE.match(line) or _XDIST.match(line)
                if m:
                    test, outcome = (m.group(1), m.group(2)) if _VERBOSE.match(line) else (m.group(2), m.group(1))
                    counts[outcome] = counts.get(outcome, 0) + 1
                    last = test
                    if outcome in ("FAILED", "ERROR") and test not in failed:
                        failed.append(test)
                m = _SUMMARY.match(line)
                if m and m.group(2) not in failed:
                    failed.append(m.group(2))
    except OSError:
        pass
    return {"counts_from_log": counts, "failed_from_log": failed[:60], "last_test_seen": last}


# ---------------------------------------------------------------------------------------------------
# targets
def validate_targets(targets) -> list[str]:
    """Problems with a targets.json payload: its keys must be exactly TARGET_KEYS, "device" a string and every
    other value a finite number or null."""
    if not isinstance(targets, dict):
        return [f"targets.json must hold an object, got {type(targets).__name__}"]
    problems = []
    keys = set(targets)
    if keys != set(TARGET_KEYS):
        missing, extra = sorted(set(TARGET_KEYS) - keys), sorted(keys - set(TARGET_KEYS))
        problems.append(f"keys differ from the schema: missing {missing}, unexpected {extra}")
    if not isinstance(targets.get("device"), str) or not targets.get("device"):
        problems.append(f"device must be a non-empty string, got {targets.get('device')!r}")
    for key in TARGET_KEYS[1:]:
        v = targets.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"{key} must be a finite number or null, got {v!r}")
    return problems


# ---------------------------------------------------------------------------------------------------
# stage records
def stage_details(stage: str, out_dir: str, work_dir: str, root: str) -> dict:
    log = os.path.join(out_dir, f"{stage}.log")
    d: dict = {"log": f"{stage}.log", "log_tail": tail(log, 25)}
    if stage == "build":
        d["build_info"] = read_json(os.path.join(root, "structure_ops", "_build_info.json"))
        pkg = os.path.join(root, "structure_ops")
        d["extensions"] = sorted(f for f in os.listdir(pkg) if f.endswith(".so")) if os.path.isdir(pkg) else []
        spills = [line.strip() for line in tail(log, 100000) if re.search(r"[1-9]\d* bytes spill", line)]
        d["ptxas_spill_lines"] = spills[:40]
    elif stage == "load":
        d.update(read_json(os.path.join(work_dir, "load.json")) or {"load_check": "no result (killed before it finished?)"})
    elif stage == "tests":
        d["junit"] = summarize_junit(os.path.join(work_dir, "tests.xml"))
        d.update(summarize_log(log))
    elif stage == "bench":
        targets = read_json(os.path.join(out_dir, "targets.json"))
        d["targets"] = targets
        d["targets_problems"] = validate_targets(targets) if targets is not None else ["no targets.json"]
        bench = read_json(os.path.join(out_dir, "bench.json")) or {}
        d["notes"] = bench.get("notes")
        d["checks_failed"] = [c for c in bench.get("checks", []) if c.get("ok") is False]
    return d


def record(out_dir, work_dir, mode, stage, status, seconds, budget, rc, cpu_s="") -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(out_dir, "stages.json")
    data = read_json(path) or {}
    data.setdefault("mode", mode)
    data.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
    stages = data.setdefault("stages", {})
    entry = {"status": status, "seconds": round(float(seconds), 1), "budget_s": float(budget)}
    if rc != "":
        entry["rc"] = int(rc)
    if cpu_s != "":
        entry["cpu_s"] = float(cpu_s)  # user + system CPU seconds of the stage's processes (those that finished)
    if status != "running":
        entry["details"] = stage_details(stage, out_dir, work_dir, root)
    stages[stage] = entry
    data["total_seconds"] = round(sum(s.get("seconds", 0.0) for s in stages.values()), 1)
    data["ok"] = all(stages.get(s, {}).get("status") == "ok" for s in STAGES)
    write_json(path, data)


# ---------------------------------------------------------------------------------------------------
# stage 2: the load check
def load_check(work_dir: str, mode: str) -> int:
    """Import the package, print the environment report, assert that the extensions a run needs load and that
    raw torch.ops.structure_ops.* run without the public API. Writes WORK_DIR/load.json; 0 when all is well."""
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    import structure_ops
    from structure_ops import info, reference
    from structure_ops._ops import cuda_build_problem, cuda_targets, extension_error

    print(info.report(), flush=True)
    gpu = torch.cuda.is_available()
    res: dict = {"cuda_available": gpu, "torch": torch.__version__, "import_s": round(time.perf_counter() - t0, 2),
                 "ext_C": extension_error("_C"), "ext_C_cuda": extension_error("_C_cuda"), "cuda_targets": cuda_targets()}
    problems = []
    if res["ext_C"]:
        problems.append(f"the CPU extension: {res['ext_C']}")
    if gpu:
        res["device"] = torch.cuda.get_device_name()
        res["capability"] = list(torch.cuda.get_device_capability())
        why = cuda_build_problem(True, res["ext_C_cuda"], tuple(res["capability"]), cuda_targets())
        if why:
            problems.append(why)
    elif mode == "gpu":
        problems.append("no CUDA GPU is visible to torch")
    # raw ops, no public API call before: the C++ knn (CUDA when built) and the Triton knn (lazy registration)
    dev = "cuda" if gpu else "cpu"
    a = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    want = reference.knn(a, 5)
    raw = {}
    if gpu:
        ops = (["knn"] if not res["ext_C_cuda"] else []) + ["triton_knn"]
    else:
        ops = ["knn"] + (["triton_knn"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for op in ops:
        try:
            got = getattr(torch.ops.structure_ops, op)(a.to(dev), 5).cpu()
            raw[op] = "ok" if torch.equal(got, want) else f"wrong indices ({(got != want).sum().item()} differ)"
        except Exception as e:  # noqa: BLE001
            raw[op] = f"{type(e).__name__}: {str(e)[:300]}"
        if raw[op] != "ok":
            problems.append(f"raw torch.ops.structure_ops.{op} on {dev} float64: {raw[op]}")
    res["raw_ops"] = raw
    res["problems"] = problems
    res["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(os.path.join(work_dir, "load.json"), res)
    print(json.dumps(res, indent=1), flush=True)
    for p in problems:
        print(f"LOAD CHECK FAILED: {p}", flush=True)
    del structure_ops
    return 1 if problems else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "record":
        record(*args)
        return 0
    if cmd == "load-check":
        return load_check(*args)
    if cmd == "validate-targets":
        problems = validate_targets(read_json(args[0]))
        for p in problems:
            print(f"targets.json: {p}")
        if not problems:
            print(f"targets.json: the {len(TARGET_KEYS)} keys, all numbers or null")
        return 1 if problems else 0
    print(f"unknown command {cmd!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
