#!/usr/bin/env bash
# A fleet of three Tethers sharing sessions through Redis, on one machine:
#
#   redis-server                 127.0.0.1:6390
#   three demo backends          127.0.0.1:9101-9103
#   three Tether instances       127.0.0.1:8081-8083 (admin API and dashboard on 9981-9983)
#
# The instances persist on the demo app's own session cookie (`demo_visitor`, learned from
# its Set-Cookie), so a client keeps its backend whichever instance it reaches; admin
# actions made on one instance reach the others. Run it from anywhere:
#
#   examples/fleet.sh            start everything, print what to try, wait for Ctrl-C
#   FLEET_CHECK=1 examples/fleet.sh
#                                start, check that sessions and drains are shared, stop
#
# Needs redis-server (apt-get install redis-server) and curl. TETHER names the binary
# (default: target/release/tether, built when missing); BASE shifts every port (default
# 0: the ports above).
set -euo pipefail
cd "$(dirname "$0")/.."

base=${BASE:-0}
redis_port=$((6390 + base))
tether=${TETHER:-target/release/tether}
if [ ! -x "$tether" ]; then
  cargo build --release --quiet
fi
command -v redis-server >/dev/null || { echo "fleet.sh: redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }

dir=$(mktemp -d)
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

# Waits until `curl` gets an answer from $1, for at most ten seconds.
wait_for() {
  for _ in $(seq 100); do
    if curl -s -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "fleet.sh: nothing answers at $1 (logs in $dir)" >&2
  exit 1
}

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$dir/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$redis_port") 2>/dev/null; then break; fi
  sleep 0.1
done

# The key that hashes session keys before they reach Redis: one per fleet.
head -c 32 /dev/urandom | base64 >"$dir/store.key"

for i in 1 2 3; do
  "$tether" backend --name "app-$i" --bind "127.0.0.1:$((9100 + base + i))" >"$dir/app-$i.log" 2>&1 &
  pids+=($!)
done

for i in 1 2 3; do
  cat >"$dir/tether-$i.toml" <<EOF
store = "fleet"

[stores.fleet]
address = "127.0.0.1:$redis_port"
prefix = "demo"
key_file = "$dir/store.key"

[admin]
bind = "127.0.0.1:$((9980 + base + i))"

[[listeners]]
name = "web"
bind = "127.0.0.1:$((8080 + base + i))"
pool = "web"

[pools.web]
algorithm = "random"
backends = [
  { name = "app-1", address = "127.0.0.1:$((9101 + base))" },
  { name = "app-2", address = "127.0.0.1:$((9102 + base))" },
  { name = "app-3", address = "127.0.0.1:$((9103 + base))" },
]

[pools.web.affinity]
# The application's own session cookie, learned from its Set-Cookie and shared by the fleet.
keys = ["app_cookie:demo_visitor"]
EOF
  "$tether" run -c "$dir/tether-$i.toml" >"$dir/tether-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  wait_for "http://127.0.0.1:$((8080 + base + i))/"
  wait_for "http://127.0.0.1:$((9980 + base + i))/api/fleet"
done

web() { echo "http://127.0.0.1:$((8080 + base + $1))"; }
admin() { echo "http://127.0.0.1:$((9980 + base + $1))"; }

if [ -z "${FLEET_CHECK:-}" ]; then
  cat <<EOF
A fleet of three Tethers is up (logs in $dir). Try:

  # A visit through the first instance: the demo app sets its session cookie.
  curl -si -c /tmp/jar $(web 1)/ | grep -i -e x-backend -e set-cookie
  # The same session through the other two: the same backend (X-Backend).
  curl -si -b /tmp/jar $(web 2)/ | grep -i x-backend
  curl -si -b /tmp/jar $(web 3)/ | grep -i x-backend
  # Drain that backend through the first instance; the others drain it too.
  curl -s -X POST $(admin 1)/api/pools/web/backends/app-1/drain
  curl -s $(admin 3)/metrics | grep 'tether_backend_admin_state{pool="web",backend="app-1"'
  # The fleet as one instance sees it; the dashboard is at $(admin 1)/
  curl -s $(admin 2)/api/fleet

Ctrl-C stops everything.
EOF
  wait
  exit 0
fi

# FLEET_CHECK: a session learned on one instance keeps its backend on the others, and a
# drain made through one reaches them all.
first=$(curl -si -c "$dir/jar" "$(web 1)/")
home=$(printf '%s' "$first" | tr -d '\r' | sed -n 's/^x-backend: //Ip')
[ -n "$home" ] || { echo "fleet.sh: no X-Backend in: $first" >&2; exit 1; }
for round in 1 2 3; do
  for i in 1 2 3; do
    got=$(curl -si -b "$dir/jar" "$(web "$i")/" | tr -d '\r' | sed -n 's/^x-backend: //Ip')
    if [ "$got" != "$home" ]; then
      echo "fleet.sh: round $round, instance $i sent the session to $got, not $home" >&2
      exit 1
    fi
  done
done
echo "fleet.sh: one session stayed on $home through all three instances"
curl -sf -X POST "$(admin 1)/api/pools/web/backends/$home/drain" >/dev/null
for i in 2 3; do
  drained=""
  for _ in $(seq 50); do
    if curl -s "$(admin "$i")/metrics" | grep -qF "tether_backend_admin_state{pool=\"web\",backend=\"$home\",state=\"draining\"} 1"; then
      drained=yes
      break
    fi
    sleep 0.1
  done
  [ -n "$drained" ] || { echo "fleet.sh: instance $i did not drain $home" >&2; exit 1; }
done
echo "fleet.sh: a drain of $home through instance 1 reached instances 2 and 3"
instances=$(curl -s "$(admin 2)/api/fleet" | grep -o '"pid"' | wc -l)
[ "$instances" -eq 3 ] || { echo "fleet.sh: the fleet lists $instances instances, not 3" >&2; exit 1; }
echo "fleet.sh: the fleet lists 3 instances"
