#!/usr/bin/env bash
# Side-by-side load test of coserve and llama.cpp's llama-server on the same GGUF file,
# threads and machine, one right after the other (the only fair comparison on a noisy box).
#
#   scripts/bench-vs-llama-cpp.sh PATH/TO/llama-server [coserve binary] [concurrency list]
#
# llama.cpp is not part of this repository: build llama-server yourself (CPU build) and pass
# its path. Results go to bench-results/ as JSON, one file per server and mode.
set -euo pipefail
LLAMA_SERVER=${1:?usage: $0 PATH/TO/llama-server [coserve-binary] [concurrency]}
COSERVE=${2:-target/release/coserve}
LEVELS=${3:-1,4,16,64}
THREADS=${THREADS:-2}
MODEL=${MODEL:-$("$COSERVE" fetch-model)}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
common=(--concurrency "$LEVELS" --rounds 1 --min-requests 4 --max-tokens 128)

echo "== llama.cpp llama-server (16 slots, $THREADS threads)"
"$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" --host 127.0.0.1 --port 8091 -np 16 -c 8192 \
  --no-webui >"$OUT/llama-server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do curl -sf 127.0.0.1:8091/health >/dev/null && break; sleep 1; done
"$COSERVE" bench --url http://127.0.0.1:8091 --request-model x --pid "$pid" "${common[@]}" \
  --json "$OUT/llama-cpp.json"
kill "$pid"; wait "$pid" 2>/dev/null || true

for dtype in ${DTYPES:-gguf q8_0 f32}; do
  echo "== coserve --weights-dtype $dtype ($THREADS threads)"
  "$COSERVE" bench --model "$MODEL" --weights-dtype "$dtype" --threads "$THREADS" "${common[@]}" \
    --json "$OUT/coserve-$dtype.json"
done
