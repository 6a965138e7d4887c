#!/usr/bin/env python
"""Render benchmarks/results/<device>/*.json as markdown tables (the README's benchmark section).

Per op and shape (dims, dtype, options): one row per (mode, N) with the median time of each provider,
the speedup of cpu over reference and over compile_reference, the cpu GFLOP/s (FLOP model of the op),
the cpu kernel's roofline (its bound on the machine's measured ceilings, the binding resource, and the
measured fraction of it: benchmarks/roofline.py), the peak extra memory of each provider and the memory
ratio reference / cpu. Skipped or failed points show "skip" / "fail" and are explained under the table.

    python benchmarks/report.py                                 # every device folder under benchmarks/results
    python benchmarks/report.py --device cpu
    python benchmarks/report.py --results /tmp/bench            # a folder of <op>.json files
    python benchmarks/report.py --readme README.md              # also replace the table in the README
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROVIDERS = ("reference", "compile_reference", "cpu")
SHORT = {"reference": "ref", "compile_reference": "compiled ref", "cpu": "cpu"}
OP_ORDER = ("structure", "clip", "siglip", "knn", "mutual_knn")
MODE_ORDER = ("fwd", "fwd+bwd")
MARK_OPEN, MARK_CLOSE = "<!-- BENCHMARK TABLE -->", "<!-- /BENCHMARK TABLE -->"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    ms = s * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_mb(mb: float | None) -> str:
    if mb is None:
        return "–"
    if mb >= 1024:
        return f"{mb / 1024:.1f} GiB"
    return f"{max(mb, 0):.0f} MB"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def roofline_cells(r: dict | None) -> list[str]:
    """[bound (binding resource), measured fraction of the bound] of one record, "–" where absent."""
    if not r or not r.get("bound_s"):
        return ["–", "–"]
    frac = r.get("fraction_of_bound")
    return [f"{fmt_time(r['bound_s'])} ({r.get('bound_by', '?')})", "–" if frac is None else f"{100 * frac:.0f} %"]


def _status(r: dict | None) -> str | None:
    """None when the record holds a measurement, else the cell text."""
    if r is None:
        return "–"
    if r.get("skipped"):
        return "skip"
    if r.get("error") or not r.get("median_s"):
        return "fail"
    return None


def noise(r: dict) -> str | None:
    """Why a timing looks unreliable: other processes busy on the cores while it ran (OpenMP barriers then
    wait for descheduled threads: times jump by 10-100x) or a wide p20–p80 spread."""
    why = []
    others = r.get("other_busy_cores")
    if others is not None and others > 0.2:
        why.append(f"other processes kept {others:.2f} cores busy while timing")
    if r.get("p20_s") and r.get("p80_s") and r["p80_s"] > 1.5 * r["p20_s"]:
        why.append(f"p20–p80 {fmt_time(r['p20_s'])}–{fmt_time(r['p80_s'])}")
    return "; ".join(why) or None


def load(paths: list[str]) -> list[dict]:
    records = []
    for p in paths:
        try:
            with open(p) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"warning: cannot read {p}: {exc}", file=sys.stderr)
            continue
        for r in data.get("records", []):
            r["_file"] = p
            records.append(r)
    return records


def _dims(r: dict) -> str:
    d = ", ".join(f"{k}={v}" for k, v in r["dims"].items())
    opts = ", ".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items()) if not (k == "levels" and v == 1))
    return f"{d}, {r['dtype']}" + (f", {opts}" if opts else "")


def render(records: list[dict]) -> str:
    out: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        dev = r.get("device", {})
        key = (dev.get("name", "?"), dev.get("cores"), r["op"], _dims(r))
        groups.setdefault(key, []).append(r)

    def gkey(k):
        return (k[0], k[1] or 0, OP_ORDER.index(k[2]) if k[2] in OP_ORDER else 99, k[3])

    for key in sorted(groups, key=gkey):
        dev_name, cores, op, dims = key
        rs = groups[key]
        shas = sorted({(r.get("git_sha") or "?")[:10] + ("+dirty" if r.get("git_dirty") else "") for r in rs})
        torchs = sorted({r.get("torch", "?") for r in rs})
        threads = sorted({str(r.get("threads") or r.get("device", {}).get("torch_threads", "?")) for r in rs})
        dates = sorted({(r.get("timestamp") or "?")[:10] for r in rs})
        out.append(f"### {op} ({dims})\n")
        out.append(
            f"{dev_name}, {cores} cores, {'/'.join(threads)} threads; torch {', '.join(torchs)}; "
            f"git {', '.join(shas)}; {', '.join(dates)}. Median of repeats (p20–p80 in the JSON); "
            "peak = extra resident memory of one call.\n"
        )
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rs)]
        head = ["mode", "N"] + [f"{SHORT[p]}" for p in provs]
        if "cpu" in provs:
            if "reference" in provs:
                head.append("cpu vs ref")
            if "compile_reference" in provs:
                head.append("cpu vs compiled")
            head.append("cpu GFLOP/s")
            if any(r.get("bound_s") for r in rs if r["provider"] == "cpu"):
                head += ["cpu bound", "cpu % of bound"]
        head += [f"peak {SHORT[p]}" for p in provs]
        if "cpu" in provs and "reference" in provs:
            head.append("mem ref / cpu")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|")
        by = {(r["mode"], r["N"], r["provider"]): r for r in rs}
        notes: list[str] = []
        rows = sorted({(r["mode"], r["N"]) for r in rs},
                      key=lambda t: (MODE_ORDER.index(t[0]) if t[0] in MODE_ORDER else 9, t[1]))  # fmt: skip
        for mode, n in rows:
            cell = {p: by.get((mode, n, p)) for p in provs}
            row = [mode, f"{n:,}".replace(",", " ")]
            for p in provs:
                st = _status(cell[p])
                noisy = None if st else noise(cell[p])
                row.append(st if st else fmt_time(cell[p]["median_s"]) + (" *" if noisy else ""))
                if noisy:
                    notes.append(f"\\* {SHORT[p]} {mode} N={n}: {noisy}")
                if st in ("skip", "fail"):
                    why = (cell[p].get("skip_reason") or cell[p].get("error") or "?").replace("\n", " ")
                    notes.append(f"{SHORT[p]} {mode} N={n}: {st}: {why[:300]}")
            ok = {p: cell[p] for p in provs if _status(cell[p]) is None}
            if "cpu" in provs:
                c = ok.get("cpu")
                for other in ("reference", "compile_reference"):
                    if other in provs:
                        o = ok.get(other)
                        row.append(fmt_ratio(o["median_s"] / c["median_s"]) if (c and o) else "–")
                row.append(f"{c['gflops']:.0f}" if c and c.get("gflops") else "–")
                if "cpu bound" in head:
                    row += roofline_cells(c)
            for p in provs:
                row.append(fmt_mb(ok[p].get("peak_extra_mb")) if p in ok else "–")
            if "cpu" in provs and "reference" in provs:
                c, o = ok.get("cpu"), ok.get("reference")
                cm, om = (c or {}).get("peak_extra_mb"), (o or {}).get("peak_extra_mb")
                row.append(fmt_ratio(om / cm) if (cm and om and cm > 0) else "–")
            out.append("| " + " | ".join(row) + " |")
        for (mode, n, prov), r in sorted(by.items()):
            ref = by.get((mode, n, "reference"))
            if prov == "reference" or op == "knn" or not ref or _status(r) or _status(ref):
                continue
            v, want = r.get("value"), ref.get("value")
            if v is not None and want is not None and abs(v - want) > 1e-3 * abs(want) + 1e-6:
                notes.append(f"{SHORT[prov]} {mode} N={n}: value {v:.6g} differs from the reference's {want:.6g}")
        ceils = sorted({r.get("roofline_ceilings") for r in rs if r.get("roofline_ceilings")})
        if ceils:
            notes.append(
                "cpu bound = max(GEMM FLOPs / GEMM peak, exp/log/div ops / exp rate, memory bytes / copy bandwidth) of "
                f"the cpu kernel's model on {'; '.join(ceils)} (benchmarks/roofline.py); % of bound = bound / median"
            )
        backends = sorted({r.get("compile_backend") for r in rs if r.get("compile_backend")})
        if backends:
            notes.insert(0, f"compiled ref = torch.compile(reference, backend={'/'.join(backends)})")
        for r in rs:
            if r.get("compile_fallback_reason"):
                notes.append(f"compiled ref {r['mode']} N={r['N']}: {r['compile_fallback_reason'][:200]}")
        if notes:
            out.append("")
            out.extend(f"- {n}" for n in notes)
        out.append("")
    return "\n".join(out)


def update_readme(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    block = f"{MARK_OPEN}\n{table.rstrip()}\n{MARK_CLOSE}"
    if MARK_OPEN not in text:
        raise SystemExit(f"{path}: no {MARK_OPEN} marker")
    start = text.index(MARK_OPEN)
    end = text.find(MARK_CLOSE, start)
    end = start + len(MARK_OPEN) if end < 0 else end + len(MARK_CLOSE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text[:start] + block + text[end:])
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"),
                   help="results root (with <device>/ folders) or a folder of <op>.json files")  # fmt: skip
    p.add_argument("--device", default=None, help="only this device folder (e.g. cpu)")
    p.add_argument("--readme", default=None, help=f"replace the {MARK_OPEN} block of this file with the tables")
    args = p.parse_args(argv)
    root = os.path.join(args.results, args.device) if args.device else args.results
    paths = sorted(glob.glob(os.path.join(root, "*.json")) + glob.glob(os.path.join(root, "*", "*.json")))
    records = load(paths)
    if not records:
        print(f"no benchmark records under {root}", file=sys.stderr)
        return 1
    table = render(records)
    print(table)
    if args.readme:
        update_readme(args.readme, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
