#!/usr/bin/env python3
"""Engine iteration times from a server's trace log (RUST_LOG=coserve::engine=trace).

Prints, for the iterations that carried inference rows, the duration's p50/p90/p99 and, by
the kind of training work they also carried, how far the cost model's prediction missed.
Usage: scripts/iteration-times.py LOG
"""
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=([\d.]+)")


def pct(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def main(path):
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = ANSI.sub("", line)
            if " iteration " not in line and not line.rstrip().endswith("iteration"):
                continue
            rows.append({k: float(v) for k, v in FIELD.findall(line)})
    serving = [r for r in rows if r.get("n_decode", 0) + r.get("n_prefill", 0) > 0]
    if not serving:
        sys.exit(f"{path}: no iterations with inference rows")
    ms = sorted(r["ms"] for r in serving)
    print(f"iterations {len(rows)}, with inference rows {len(serving)}")
    print(f"  ms p50 {pct(ms, .5):.0f}  p90 {pct(ms, .9):.0f}  p99 {pct(ms, .99):.0f}  max {ms[-1]:.0f}")
    for kind in ("train_fwd", "loss_rows", "bwd_layer_tokens"):
        sel = [r for r in serving if r.get(kind, 0) > 0]
        if not sel:
            continue
        miss = sorted(r["ms"] - r["predicted_ms"] for r in sel)
        d = sorted(r["ms"] for r in sel)
        print(
            f"  with {kind:<16} {len(sel):4}: ms p50 {pct(d, .5):.0f} max {d[-1]:.0f}; "
            f"actual - predicted p50 {pct(miss, .5):+.0f} p90 {pct(miss, .9):+.0f} ms"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
