#!/usr/bin/env bash
# Scrape a running service with a real Prometheus (Debian: apt install prometheus) and
# print the target's health and one of the service's metrics.
#
#   METRICS_TOKEN=... make run            # in one shell (the server needs the token too)
#   METRICS_TOKEN=... scripts/prometheus_check.sh [host:port]
set -euo pipefail
target="${1:-127.0.0.1:8000}"
: "${METRICS_TOKEN:?set METRICS_TOKEN to the token the server was started with}"
command -v prometheus >/dev/null || { echo "Prometheus is not installed (apt install prometheus)." >&2; exit 2; }

work="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/prometheus.yml" <<YAML
global: {scrape_interval: 2s}
scrape_configs:
  - job_name: callwaiting-tts
    authorization: {credentials: ${METRICS_TOKEN}}
    static_configs: [{targets: ['${target}']}]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/data" \
  --web.listen-address=127.0.0.1:9099 >"$work/prometheus.log" 2>&1 &
pid=$!
sleep 6
curl -fsS http://127.0.0.1:9099/api/v1/targets | python3 -c '
import json, sys
for target in json.load(sys.stdin)["data"]["activeTargets"]:
    print(target["scrapeUrl"], target["health"], target["lastError"] or "")'
curl -fsS "http://127.0.0.1:9099/api/v1/query?query=cwt_engine_busy_seconds_total" | python3 -m json.tool
