#!/usr/bin/env python
"""Compare two CPU benchmark runs (before / after a change) point by point: per-op time ratios.

    python benchmarks/compare_runs.py benchmarks/results/cpu-intel-xeon-processor --before before_ --after after_
    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR                       # <op>.json in each folder

For every (op, provider, mode, N, dims, dtype, params, threads) point present in both runs it prints the
two medians, ``after / before`` (> 1: slower) and, when the same run also timed the reference provider,
the ratio of ``provider / reference`` after over before: the reference's code did not change, so this
normalized ratio cancels a machine that was busier in one run than in the other. Points timed while other
processes kept the cores busy are flagged (``other_busy_cores`` > 0.2). The summary gives, per op and
provider, the geometric mean of both ratios. ``--fail-above R`` exits 1 when a cpu point's normalized
ratio (or, without a reference, its raw ratio) exceeds R.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

NOISY = 0.2


def _key(r: dict) -> tuple:
    return (r["op"], r["provider"], r["mode"], int(r["N"]), tuple(sorted(r.get("dims", {}).items())),
            r.get("dtype", "float32"), tuple(sorted((k, str(v)) for k, v in r.get("params", {}).items())),
            r.get("threads"))  # fmt: skip


def load_run(folder: str, prefix: str = "") -> dict[tuple, dict]:
    """{point key: record} of every measured record in ``folder/<prefix><op>.json``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}*.json"))):
        name = os.path.basename(path)[len(prefix) :]
        if prefix == "" and name.startswith(("before_", "after_")):
            continue
        with open(path) as f:
            data = json.load(f)
        for r in data.get("records", []):
            if r.get("median_s"):
                out[_key(r)] = r
    return out


def _ref_key(k: tuple) -> tuple:
    return (k[0], "reference") + k[2:]


def compare(before: dict[tuple, dict], after: dict[tuple, dict]) -> list[dict]:
    rows = []
    for k in sorted(set(before) & set(after), key=lambda k: (k[0], k[1], k[2], k[4], k[3])):
        b, a = before[k], after[k]
        row = {"op": k[0], "provider": k[1], "mode": k[2], "N": k[3], "dims": dict(k[4]), "threads": k[7],
               "before_s": b["median_s"], "after_s": a["median_s"], "ratio": a["median_s"] / b["median_s"],
               "normalized": None,
               "noisy": any((r.get("other_busy_cores") or 0) > NOISY for r in (a, b))}  # fmt: skip
        rk = _ref_key(k)
        if k[1] != "reference" and rk in before and rk in after:
            rb, ra = before[rk]["median_s"], after[rk]["median_s"]
            row["normalized"] = (a["median_s"] / ra) / (b["median_s"] / rb)
        rows.append(row)
    return rows


def _gmean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def render(rows: list[dict]) -> str:
    out = ["| op | provider | mode | N | dims | threads | before | after | after / before | normalized by ref |",
           "|---|---|---|--:|---|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in rows:
        dims = " ".join(f"{k}={v}" for k, v in r["dims"].items())
        norm = "–" if r["normalized"] is None else f"{r['normalized']:.2f}"
        out.append(
            f"| {r['op']} | {r['provider']} | {r['mode']} | {r['N']} | {dims} | {r['threads']} | "
            f"{r['before_s'] * 1e3:.1f} ms | {r['after_s'] * 1e3:.1f} ms | {r['ratio']:.2f}{' *' if r['noisy'] else ''} | {norm} |"
        )
    out += [
        "",
        "| op | provider | threads | points | geomean after / before | geomean normalized |",
        "|---|---|--:|--:|--:|--:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["provider"], r["threads"] or 0), []).append(r)
    for (op, prov, threads), rs in sorted(groups.items()):
        g = _gmean([r["ratio"] for r in rs])
        gn = _gmean([r["normalized"] for r in rs if r["normalized"]])
        out.append(f"| {op} | {prov} | {threads} | {len(rs)} | {g:.2f} | {'–' if gn is None else f'{gn:.2f}'} |")
    if any(r["noisy"] for r in rows):
        out.append("\n\\* other processes kept > 0.2 cores busy while one of the two points was timed")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="folder of the first run")
    p.add_argument("after", nargs="?", default=None, help="folder of the second run (default: the same folder)")
    p.add_argument("--before-prefix", "--before", dest="bp", default=None, help="file prefix of the first run")
    p.add_argument("--after-prefix", "--after", dest="ap", default=None, help="file prefix of the second run")
    p.add_argument("--fail-above", type=float, default=None, help="exit 1 if a cpu point's ratio exceeds this")
    a = p.parse_args(argv)
    after_dir = a.after or a.before
    bp = a.bp if a.bp is not None else ("before_" if a.after is None else "")
    ap = a.ap if a.ap is not None else ("after_" if a.after is None else "")
    before, after = load_run(a.before, bp), load_run(after_dir, ap)
    rows = compare(before, after)
    if not rows:
        print(f"no common measured points between {a.before}/{bp}*.json and {after_dir}/{ap}*.json", file=sys.stderr)
        return 2
    print(render(rows))
    if a.fail_above is not None:
        bad = [r for r in rows if r["provider"] == "cpu"
               and (r["normalized"] if r["normalized"] is not None else r["ratio"]) > a.fail_above]  # fmt: skip
        if bad:
            print(f"\n{len(bad)} cpu point(s) slower than {a.fail_above}x", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
