#!/usr/bin/env bash
# The shared store's bench (issue 13): ../shared/bench/run.sh's sticky workload with a
# table-mapped key (its virtual user id is the `u` query parameter: keys = ["query:u"],
# mapping = "table"), Tether with its pins shared through a real redis-server and without.
#
#   bash bench/store-onoff.sh        # PAIRS=3, and run.sh's own knobs (DURATION, CONNS, ...)
#
# run.sh measures one LB_CMD per invocation, so this invokes it 2 x PAIRS times, alternating
# off, on, off, on, ... with ROUNDS=1 (and no idle-connection test) and HAProxy sticky
# beside Tether in each as the anchor (run.sh interleaves the two), so that both states
# meet the same machine within minutes. It prints, per concurrency, Tether's req/s with
# Redis on over off for each pair, raw and against the anchor of its own invocation, and
# their medians; and the commands Redis processed in each "on" invocation, per new
# session and per request measured.
# Needs redis-server (apt-get install -y redis-server) besides what run.sh needs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
harness="$here/../shared/bench/run.sh"
work="${BENCH_WORK:-/tmp/tether-bench}"
pairs="${PAIRS:-3}"
port="${REDIS_PORT:-16380}"
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
[ -x "$here/target/release/tether" ] || (cd "$here" && cargo build --release --quiet)
mkdir -p "$work"

redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  >"$work/store-redis.log" 2>&1 &
redis=$!
trap 'kill $redis 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$port" ping >/dev/null

run() { # state pair
  local out="store-$1-$2" extra=()
  [ "$1" = on ] && extra=(LB_REDIS="127.0.0.1:$port")
  if [ "$1" = on ]; then redis-cli -p "$port" flushall >/dev/null; redis-cli -p "$port" config resetstat >/dev/null; fi
  env IDLE_CONNS="${IDLE_CONNS:-0}" SYSTEMS="haproxy-sticky" LB_NAME=tether LB_STICKY=1 LB_KEYS=query:u "${extra[@]}" \
    LB_CMD="bash $here/bench/tether-lb.sh" ROUNDS=1 OUT="$out" bash "$harness" >"$work/$out.log" 2>&1
  if [ "$1" = on ]; then
    redis-cli -p "$port" info stats | tr -d '\r' | sed -n 's/^total_commands_processed://p' >"$work/$out.ops"
  fi
}
for i in $(seq "$pairs"); do
  run off "$i"
  run on "$i"
done

python3 - "$work" "$pairs" "${USERS:-1000}" <<'EOF'
import csv, statistics, sys
work, pairs, users = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rows(name):
    """(system, conns) -> req/s of the last quiet attempt (else the last), and Tether's
    requests measured."""
    rps, quiet, requests = {}, set(), 0
    for r in csv.DictReader(open(f"{work}/{name}.csv")):
        key = (r["system"], int(r["conns"]))
        if key not in quiet:
            rps[key] = float(r["rps"])
        if r["noisy"] == "0":
            quiet.add(key)
        if r["system"] == "tether":
            requests += int(r["requests"])
    return rps, requests
ratios = {}
for i in range(1, pairs + 1):
    off, _ = rows(f"store-off-{i}")
    on, requests = rows(f"store-on-{i}")
    ops = int(open(f"{work}/store-on-{i}.ops").read().strip() or 0) - 1  # less CONFIG RESETSTAT, counted after its own reset
    print(f"pair {i}: Redis processed {ops} commands in the \"on\" run, {ops / users:.2f} per new session "
          f"({users} virtual users) and {ops / requests:.5f} per request measured ({requests})")
    for c in sorted({k[1] for k in on}):
        raw = on[("tether", c)] / off[("tether", c)]
        anchored = (on[("tether", c)] / on[("haproxy-sticky", c)]) / (off[("tether", c)] / off[("haproxy-sticky", c)])
        ratios.setdefault(c, []).append((raw, anchored))
        print(f"  {c:>4} conns: off {off[('tether', c)]:9.0f} req/s ({off[('tether', c)] / off[('haproxy-sticky', c)]:.2f}x HAProxy), "
              f"on {on[('tether', c)]:9.0f} ({on[('tether', c)] / on[('haproxy-sticky', c)]:.2f}x); on/off {raw:.3f}, against the anchor {anchored:.3f}")
for c, rs in sorted(ratios.items()):
    print(f"median on/off at {c} conns: {statistics.median(r for r, _ in rs):.3f} raw, "
          f"{statistics.median(a for _, a in rs):.3f} against the anchor")
EOF
