#!/usr/bin/env bash
# Replay a Mooncake slice through the fleetroute router with NVIDIA AIPerf (an independent load generator)
# and with `fleetroute loadgen`, then compare the two. Everything runs on loopback; every process this
# script starts is stopped on exit. See docs/aiperf.md.
#
#   scripts/aiperf_mooncake.sh                       # defaults below
#   ROWS=50 ENDPOINTS=completions scripts/aiperf_mooncake.sh
#
# Environment (defaults):
#   ROWS=100               first N rows of TRACE
#   SPEEDUP=10             trace time compression; the emulator runs at --speed SPEEDUP as well
#   ENDPOINTS="completions chat"
#   TRACE=tests/data/mooncake_conversation_head500.jsonl
#   OUT=/tmp/aiperf-mooncake     artifacts, logs, HF cache, AIPerf dataset cache
#   AIPERF_VENV=/tmp/aiperf-venv (created with `pip install aiperf` if missing)
#   BASE_PORT=18101 (replicas BASE_PORT, BASE_PORT+1), ROUTER_PORT=18180
#   RUN_TIMEOUT=600        seconds allowed for each aiperf / loadgen run
#   MAX_RATIO=2            TTFT/ITL medians of the two tools must agree within this factor
#   AIPERF_EXTRA=""        extra `aiperf profile` flags (word-split), e.g. "--request-timeout-seconds 120"
#
# Exit status: 0 all runs succeeded and the medians agree; 1 a run failed (request errors, missing
# artifacts, non-zero exit); 2 setup problem (missing venv, port in use, bad OUT); 3 runs succeeded but a
# median ratio exceeded MAX_RATIO (on a busy 2-core machine this can happen by noise; see docs/aiperf.md).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROWS="${ROWS:-100}"
SPEEDUP="${SPEEDUP:-10}"
ENDPOINTS="${ENDPOINTS:-completions chat}"
TRACE="${TRACE:-$REPO/tests/data/mooncake_conversation_head500.jsonl}"
OUT="${OUT:-/tmp/aiperf-mooncake}"
AIPERF_VENV="${AIPERF_VENV:-/tmp/aiperf-venv}"
AIPERF_EXTRA="${AIPERF_EXTRA:-}"
BASE_PORT="${BASE_PORT:-18101}"
ROUTER_PORT="${ROUTER_PORT:-18180}"
RUN_TIMEOUT="${RUN_TIMEOUT:-600}"
MAX_RATIO="${MAX_RATIO:-2}"
FLEETROUTE="$REPO/.venv/bin/fleetroute"
PY="$REPO/.venv/bin/python"
MODEL="meta-llama/Llama-3.1-8B-Instruct"   # the default profile's served model name
ROUTER="http://127.0.0.1:$ROUTER_PORT"
REPLICAS=("http://127.0.0.1:$BASE_PORT" "http://127.0.0.1:$((BASE_PORT + 1))")

log() { printf '[aiperf_mooncake %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[[ -x "$FLEETROUTE" ]] || { log "missing $FLEETROUTE (run 'make test' once to create .venv)"; exit 2; }
if [[ ! -x "$AIPERF_VENV/bin/aiperf" ]]; then
  log "installing AIPerf into its own venv $AIPERF_VENV (1-2 min)"
  python3.11 -m venv "$AIPERF_VENV"
  "$AIPERF_VENV/bin/pip" install --quiet aiperf   # brings tokenizers and transformers (no torch)
fi

case "$(realpath -m "$OUT")" in
  / | /tmp | "$HOME" | "$REPO" | "$REPO"/*) log "refusing OUT=$OUT (it is wiped at the start)"; exit 2 ;;
esac
rm -rf "$OUT"
mkdir -p "$OUT/aiperf-mmap"
AIPERF_VERSION="$("$AIPERF_VENV/bin/pip" show aiperf 2>/dev/null | awk '/^Version:/ {print $2}')"
log "AIPerf $AIPERF_VERSION, $ROWS rows of $(basename "$TRACE"), speed-up $SPEEDUP, endpoints: $ENDPOINTS, out: $OUT"

# 1. the offline tokenizer (our words) in a Hugging Face cache layout
"$AIPERF_VENV/bin/python" "$REPO/scripts/aiperf_tokenizer.py" "$OUT/hf-cache" > "$OUT/tokenizer.log" 2>&1 \
  || { cat "$OUT/tokenizer.log" >&2; log "tokenizer build/check failed"; exit 1; }
grep -E "^(wrote|round trip|AIPerf-style|CHECK)" "$OUT/tokenizer.log" >&2

# 2. the trace slice (AIPerf has no row limit for mooncake_trace; loadgen reads the same file)
head -n "$ROWS" "$TRACE" > "$OUT/slice.jsonl"

# 3. fleet: 2 emulated replicas and the router; each in its own process group, stopped on exit
PGIDS=()
cleanup() {
  local rc=$?
  for pg in "${PGIDS[@]}"; do kill -TERM -- "-$pg" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pg in "${PGIDS[@]}"; do kill -0 -- "-$pg" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for pg in "${PGIDS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null || true; done
  (( ${#PGIDS[@]} )) && log "stopped process groups ${PGIDS[*]}"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in "$BASE_PORT" "$((BASE_PORT + 1))" "$ROUTER_PORT"; do
  if (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then log "port $port is already in use"; exit 2; fi
done
setsid "$FLEETROUTE" engine --replicas 2 --base-port "$BASE_PORT" --speed "$SPEEDUP" \
  > "$OUT/engine.log" 2>&1 < /dev/null &
PGIDS+=("$!")
setsid "$FLEETROUTE" serve --host 127.0.0.1 --port "$ROUTER_PORT" \
  --replica "${REPLICAS[0]}" --replica "${REPLICAS[1]}" --policy default --admin-port 0 --log-format text \
  > "$OUT/router.log" 2>&1 < /dev/null &
PGIDS+=("$!")
for _ in $(seq 150); do
  curl -sf "$ROUTER/ready" > /dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "$ROUTER/ready" > /dev/null || { log "router not ready after 30 s"; tail -20 "$OUT"/*.log >&2; exit 1; }
log "router ready: $(curl -s "$ROUTER/ready")"

reset_caches() {  # start every run with empty prefix caches on both replicas
  for r in "${REPLICAS[@]}"; do curl -sf -X POST "$r/reset_prefix_cache" > /dev/null; done
}

# 4. per endpoint: AIPerf, then fleetroute loadgen, on the same slice at the same speed-up
status=0
for ep in $ENDPOINTS; do
  reset_caches
  log "AIPerf: $ep"
  set +e
  # HF_HUB_CACHE + HF_HUB_OFFLINE: load local/simtok from the cache built above, never the network.
  # --synthesis-speedup-ratio divides the trace timestamps (--replay-speedup is baseten_trace-only).
  # ignore_eos: the emulator then generates exactly output_length tokens (AIPerf sends it as max_tokens for
  # completions, max_completion_tokens for chat).
  # --server-metrics: the router's /metrics is scraped by default; add the replicas' vLLM-style /metrics.
  HF_HUB_CACHE="$OUT/hf-cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  AIPERF_DATASET_MMAP_CACHE_DIR="$OUT/aiperf-dataset-cache" AIPERF_DATASET_MMAP_BASE_PATH="$OUT/aiperf-mmap" \
  timeout --signal=INT --kill-after=30 "$RUN_TIMEOUT" \
    "$AIPERF_VENV/bin/aiperf" profile \
      --model "$MODEL" --url "$ROUTER" --endpoint-type "$ep" --streaming \
      --tokenizer local/simtok \
      --input-file "$OUT/slice.jsonl" --custom-dataset-type mooncake_trace \
      --fixed-schedule --synthesis-speedup-ratio "$SPEEDUP" \
      --extra-inputs ignore_eos:true \
      --random-seed 0 \
      --server-metrics "${REPLICAS[0]}/metrics" "${REPLICAS[1]}/metrics" \
      --artifact-dir "$OUT/aiperf-$ep" --ui-type none --no-gpu-telemetry \
      $AIPERF_EXTRA \
      > "$OUT/aiperf-$ep.log" 2>&1
  rc=$?
  set -e
  echo "$rc" > "$OUT/aiperf-$ep.rc"
  log "AIPerf $ep exit $rc"
  (( rc == 0 )) || { status=1; tail -30 "$OUT/aiperf-$ep.log" >&2; }

  reset_caches
  log "fleetroute loadgen: $ep"
  set +e
  timeout --kill-after=30 "$RUN_TIMEOUT" "$FLEETROUTE" loadgen --url "$ROUTER" --endpoint "$ep" \
    --trace "$OUT/slice.jsonl" --max-requests "$ROWS" --rate-scale "$SPEEDUP" \
    --output "$OUT/loadgen-$ep.json" --no-plots > "$OUT/loadgen-$ep.log" 2>&1
  rc=$?
  set -e
  echo "$rc" > "$OUT/loadgen-$ep.rc"
  log "loadgen $ep exit $rc"
  (( rc == 0 )) || { status=1; tail -30 "$OUT/loadgen-$ep.log" >&2; }
done

# 5. verify and compare
set +e
"$PY" - "$OUT" "$ROWS" "$MAX_RATIO" "$ENDPOINTS" "$ROUTER" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, rows, max_ratio, endpoints, router = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(), sys.argv[5]
ok = True      # both tools ran, every request succeeded, artifacts written
close = True   # medians agree within MAX_RATIO
lines = [
    "| endpoint | tool | requests ok/sent | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms), per request | "
    "chunk gap p50 / mean (ms), pooled | output tok/s | duration (s) | ISL total (client) | prompt tokens (server usage) "
    "| cached prompt tokens (server usage) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]
for ep in endpoints:
    art = out / f"aiperf-{ep}"
    rc = int((out / f"aiperf-{ep}.rc").read_text())
    need = ["profile_export_aiperf.json", "profile_export_aiperf.csv", "profile_export.jsonl",
            "server_metrics_export.json", "server_metrics_export.csv"]
    missing = [f for f in need if not (art / f).is_file()]
    a = json.loads((art / "profile_export_aiperf.json").read_text()) if not missing or "profile_export_aiperf.json" not in missing else {}
    recs = [json.loads(x) for x in (art / "profile_export.jsonl").read_text().splitlines()] if (art / "profile_export.jsonl").is_file() else []
    errors = sum(1 for r in recs if r.get("error"))
    n_ok = int(a.get("request_count", {}).get("avg", 0)) if a else 0
    err_count = int((a.get("error_request_count") or {}).get("avg", 0)) if a else -1
    good = rc == 0 and not missing and n_ok == rows and err_count == 0 and errors == 0 and len(recs) == rows
    print(f"AIPerf {ep}: exit {rc}, {n_ok}/{rows} requests ok, {errors} error records, "
          f"artifacts {'all present' if not missing else 'MISSING ' + ', '.join(missing)} -> {'OK' if good else 'FAILED'}")
    ok &= good
    scrape = json.loads((art / "server_metrics_export.json").read_text()) if (art / "server_metrics_export.json").is_file() else {}
    summ = scrape.get("summary", {})
    scraped = summ.get("endpoints_successful", [])
    print(f"  server metrics: {len(scraped)}/{len(summ.get('endpoints_configured', []))} endpoints scraped "
          f"({', '.join(scraped)}), {len(scrape.get('metrics', {}))} metric families")
    ok &= f"{router}/metrics" in scraped

    lrc = int((out / f"loadgen-{ep}.rc").read_text())
    lg = json.loads((out / f"loadgen-{ep}.json").read_text()) if (out / f"loadgen-{ep}.json").is_file() else {}
    lrecs = [json.loads(x) for x in (out / f"loadgen-{ep}.jsonl").read_text().splitlines()] if (out / f"loadgen-{ep}.jsonl").is_file() else []
    lgood = lrc == 0 and lg.get("completed") == rows and lg.get("failed") == 0
    print(f"loadgen {ep}: exit {lrc}, {lg.get('completed')}/{rows} completed, {lg.get('failed')} failed -> {'OK' if lgood else 'FAILED'}")
    ok &= lgood
    if not (a and lg):
        continue

    def m(key, stat):
        return (a.get(key) or {}).get(stat, float("nan"))

    usage_prompt = sum(r["metrics"].get("usage_prompt_tokens", {}).get("value", 0) for r in recs)
    usage_cached = sum(r["metrics"].get("usage_prompt_cache_read_tokens", {}).get("value", 0) for r in recs)
    lines.append(
        f"| {ep} | AIPerf | {n_ok}/{rows} | {m('time_to_first_token', 'p50'):.1f} | {m('time_to_first_token', 'p99'):.1f} "
        f"| {m('inter_token_latency', 'p50'):.2f} | {m('inter_chunk_latency', 'p50'):.2f} / {m('inter_chunk_latency', 'avg'):.2f} "
        f"| {m('output_token_throughput', 'avg'):.0f} | {m('benchmark_duration', 'avg'):.2f} "
        f"| {int(m('total_isl', 'avg')):,} | {usage_prompt:,} | {usage_cached:,} |"
    )
    l_prompt = sum(r.get("prompt_tokens") or 0 for r in lrecs)
    l_cached = sum(r.get("cached_tokens") or 0 for r in lrecs)
    lines.append(
        f"| {ep} | fleetroute loadgen | {lg['completed']}/{rows} | {lg['median_ttft_ms']:.1f} | {lg['p99_ttft_ms']:.1f} "
        f"| {lg['median_tpot_ms']:.2f} | {lg['median_itl_ms']:.2f} / {lg['mean_itl_ms']:.2f} "
        f"| {lg['output_throughput']:.0f} | {lg['duration']:.2f} | {lg['total_input_tokens']:,} | {l_prompt:,} "
        f"| {l_cached:,} |"
    )
    for name, x, y in (("TTFT p50", m("time_to_first_token", "p50"), lg["median_ttft_ms"]),
                       ("ITL p50 (AIPerf inter_token_latency vs loadgen TPOT)", m("inter_token_latency", "p50"), lg["median_tpot_ms"])):
        ratio = max(x, y) / min(x, y) if min(x, y) > 0 else float("inf")
        within = ratio <= max_ratio
        print(f"  {name}: AIPerf {x:.2f} ms vs loadgen {y:.2f} ms, ratio {ratio:.2f} "
              f"({'within' if within else 'OUTSIDE'} {max_ratio:g}x)")
        close &= within

table = "\n".join(lines)
(out / "comparison.md").write_text(table + "\n")
print()
print(table)
print()
print("RESULT runs:", "OK" if ok else "FAILED", "| comparison:", f"within {max_ratio:g}x" if close else f"OUTSIDE {max_ratio:g}x")
sys.exit(1 if not ok else 0 if close else 3)
EOF
rc=$?
set -e
if (( rc == 1 )) || (( rc != 0 && status == 0 )); then status=$rc; fi

for ep in $ENDPOINTS; do
  if [[ -f "$OUT/aiperf-$ep/profile_export_console.txt" ]]; then
    log "AIPerf $ep summary: $OUT/aiperf-$ep/profile_export_console.txt"
  fi
done
exit "$status"
