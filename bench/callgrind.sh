#!/usr/bin/env bash
# Instructions per keep-alive cookie hit, counted by callgrind (valgrind) on the release
# build: steady under a noisy machine, where timings are not.
#
#   bash bench/callgrind.sh [OUT]     # prints "instructions per request N"; profile in OUT
#
# Three `tether backend`s on 127.0.0.1:18181-18183, Tether on 127.0.0.1:19190 (one thread,
# access log off, Tether's cookie), and `wrk -t1 -c10 -d10s` sending one client's cookie.
# Needs valgrind and wrk. `callgrind_annotate OUT` shows where the instructions go.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-/tmp/tether-callgrind.out}"
bin="$here/target/release/tether"
(cd "$here" && cargo build --release --quiet)
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
for p in 18181 18182 18183; do
  "$bin" backend --name "b$p" --bind "127.0.0.1:$p" >/dev/null 2>&1 &
  pids+=($!)
done
cat >"$work/tether.toml" <<C
[runtime]
threads = 1
[access_log]
format = "off"
[[listeners]]
name = "bench"
bind = "127.0.0.1:19190"
pool = "bench"
[pools.bench]
algorithm = "round_robin"
backends = [ { name = "b1", address = "127.0.0.1:18181" }, { name = "b2", address = "127.0.0.1:18182" }, { name = "b3", address = "127.0.0.1:18183" } ]
[pools.bench.affinity]
keys = ["cookie"]
[pools.bench.affinity.cookie]
keys = ["YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXktMzI="]
C
valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run -c "$work/tether.toml" >"$work/tether.log" 2>&1 &
vg=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19190/ && break; sleep 0.3; done
cookie=$(curl -s -D - -o /dev/null http://127.0.0.1:19190/ | grep -i '^set-cookie: tether=' | sed 's/^[^:]*: //; s/;.*//' | tr -d '\r')
wrk -t1 -c10 -d10s -H "Cookie: $cookie" http://127.0.0.1:19190/ >"$work/wrk.txt"
kill -INT "$vg"
wait "$vg" || true
requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "requests $requests, instructions $total (start-up included)"
echo "instructions per request $((total / requests))"
