#!/usr/bin/env bash
# Fine-tuning throughput of coserve next to HF transformers + PEFT on the same model, shape,
# threads and machine: the two alternate for several rounds (the only fair comparison on a
# noisy box) and the medians are compared.
#
#   scripts/bench-finetune-vs-hf.sh [coserve binary] [python with torch, transformers, peft]
#
# ROUNDS (5), THREADS (2), STEPS (3 timed steps each, after one untimed) and OUT
# (bench-results) tune it; further arguments for both go in ARGS (e.g.
# ARGS="--target-modules down_proj"), for one of them in HF_ARGS (e.g. "--dtype bfloat16")
# or COSERVE_ARGS (e.g. "--train-dtype bf16"). Each run's JSON goes to
# $OUT/finetune-vs-hf.jsonl.
set -euo pipefail
COSERVE=${1:-target/release/coserve}
PYTHON=${2:-python3}
ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-2}
STEPS=${STEPS:-3}
OUT=${OUT:-bench-results}
ARGS=${ARGS:-}
HF_ARGS=${HF_ARGS:-}
COSERVE_ARGS=${COSERVE_ARGS:-}
mkdir -p "$OUT"
log="$OUT/finetune-vs-hf.jsonl"
: >"$log"
here=$(cd "$(dirname "$0")/.." && pwd)

for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round/$ROUNDS: HF PEFT" >&2
  # shellcheck disable=SC2086 # ARGS is a list of words
  HF_HUB_OFFLINE=1 TQDM_DISABLE=1 "$PYTHON" "$here/benches/hf_peft_finetune.py" \
    --threads "$THREADS" --steps "$((STEPS + 1))" $ARGS $HF_ARGS 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["system"]="hf"; print(json.dumps(d))' \
      >>"$log"
  echo "== round $round/$ROUNDS: coserve" >&2
  # shellcheck disable=SC2086
  "$COSERVE" bench-finetune --threads "$THREADS" --steps "$STEPS" --json $ARGS $COSERVE_ARGS 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); d["system"]="coserve"; print(json.dumps(d))' \
      >>"$log"
done

python3 - "$log" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
def col(system, key):
    return [r[key] for r in runs if r["system"] == system]
tps = {s: col(s, "tokens_per_s") for s in ("hf", "coserve")}
rss = {s: col(s, "peak_rss_mib") for s in ("hf", "coserve")}
for s in ("hf", "coserve"):
    print(f"{s:8} tok/s " + " ".join(f"{v:6.1f}" for v in tps[s])
          + f"  median {statistics.median(tps[s]):6.1f}  peak RSS median {statistics.median(rss[s]):.0f} MiB")
pairs = [c / h for c, h in zip(tps["coserve"], tps["hf"])]
print("coserve / HF per round: " + " ".join(f"{p:.2f}" for p in pairs)
      + f"  median {statistics.median(pairs):.2f}")
print(f"ratio of medians: {statistics.median(tps['coserve']) / statistics.median(tps['hf']):.2f}x tok/s, "
      f"{statistics.median(rss['coserve']) / statistics.median(rss['hf']):.2f}x peak RSS")
EOF
