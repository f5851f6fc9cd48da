#!/usr/bin/env bash
# Runs Tether under ../shared/bench/run.sh, the harness that measures Tether beside HAProxy
# and NGINX on this machine:
#
#   LB_NAME=tether LB_CMD="bash $PWD/bench/tether-lb.sh" bash ../shared/bench/run.sh
#
# Contract (what run.sh provides, as environment variables):
#   LB_PORT     the port to listen on, on 127.0.0.1
#   BACKENDS    comma-separated backend addresses, e.g. 127.0.0.1:18081,127.0.0.1:18082
#   LB_THREADS  worker threads (run.sh passes 1 and pins the process to one CPU)
#   LB_STICKY   1 when the run measures cookie persistence (the client replays cookies):
#               the pool then keeps sessions with Tether's own cookie (a fixed bench key)
#   LB_TLS      1 when clients speak TLS (run.sh's TLS=1): the listener is https, with the
#               certificate and key run.sh made (TLS_CERT, TLS_KEY, PEM paths)
#   LB_TLS_VERSIONS  with LB_TLS=1, the listener's tls_versions, e.g. "1.2" to speak the
#               version the harness's NGINX does (nginx 1.22 offers TLS 1.3 only when told)
# And two of Tether's own, for the shared store's bench (issue 13):
#   LB_KEYS     the sticky pool's key chain instead of Tether's cookie, e.g. "query:u"
#               (table-mapped: the harness's clients send ?u=USER)
#   LB_REDIS    HOST:PORT of a Redis the pool shares its pins through ([stores.bench])
# This script writes a config for those values under $TMPDIR and execs the release build of
# Tether with it (building it first if it is missing). The access log is off, as it is for
# the HAProxy and NGINX the harness runs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
: "${LB_PORT:?LB_PORT is required}" "${BACKENDS:?BACKENDS is required}"
threads="${LB_THREADS:-1}"
bin="$here/target/release/tether"
[ -x "$bin" ] || (cd "$here" && cargo build --release --quiet)

conf="${TMPDIR:-/tmp}/tether-bench-$LB_PORT.toml"
{
  printf '[runtime]\nthreads = %s\n\n[access_log]\nformat = "off"\n\n' "$threads"
  printf '[[listeners]]\nname = "bench"\nbind = "127.0.0.1:%s"\npool = "bench"\n' "$LB_PORT"
  if [ "${LB_TLS:-0}" = 1 ]; then
    : "${TLS_CERT:?LB_TLS=1 needs TLS_CERT}" "${TLS_KEY:?LB_TLS=1 needs TLS_KEY}"
    printf 'protocol = "https"\n'
    [ -n "${LB_TLS_VERSIONS:-}" ] && printf 'tls_versions = ["%s"]\n' "$LB_TLS_VERSIONS"
    printf '[[listeners.certificates]]\ncert = "%s"\nkey = "%s"\n' "$TLS_CERT" "$TLS_KEY"
  fi
  printf '\n'
  printf '[pools.bench]\nalgorithm = "round_robin"\nbackends = [\n'
  i=0
  IFS=',' read -ra addrs <<<"$BACKENDS"
  for a in "${addrs[@]}"; do
    i=$((i + 1))
    printf '  { name = "b%s", address = "%s" },\n' "$i" "$a"
  done
  printf ']\n'
  if [ "${LB_STICKY:-0}" = 1 ] && [ -n "${LB_KEYS:-}" ]; then
    printf '\n[pools.bench.affinity]\nkeys = ["%s"]\nmapping = "table"\n' "$LB_KEYS"
    [ -n "${LB_REDIS:-}" ] && printf 'store = "bench"\n'
  elif [ "${LB_STICKY:-0}" = 1 ]; then
    printf '\n[pools.bench.affinity]\nkeys = ["cookie"]\n\n[pools.bench.affinity.cookie]\n'
    printf 'keys = ["YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXktMzI="]\n'
  fi
  if [ -n "${LB_REDIS:-}" ]; then
    printf '\n[stores.bench]\naddress = "%s"\nprefix = "bench"\nkey_env = "TETHER_BENCH_STORE_KEY"\n' "$LB_REDIS"
  fi
} >"$conf"
export TETHER_BENCH_STORE_KEY="YmVuY2gta2V5LWJlbmNoLWtleS1iZW5jaC1rZXktMzI="
exec "$bin" run -c "$conf"
