#!/usr/bin/env bash
# Server CPU per full TLS handshake, with nothing resumed: `openssl s_time -new` (one
# handshake after another, each with a new session, no request) against each system that
# ../shared/bench/run.sh keeps up, and the CPU its whole process tree used meanwhile.
#
#   TLS=1 SYSTEMS="nginx-rr haproxy-rr" LB_NAME=tether LB_STICKY=0 \
#     LB_CMD="bash $PWD/bench/tether-lb.sh" bash ../shared/bench/run.sh --up &
#   bash bench/full-handshakes.sh nginx-rr:19003 haproxy-rr:19001 tether:19010
#
# run.sh's NEWCONN=1 does not measure this: wrk keeps its TLS session across reconnects
# (OpenSSL's SSL_clear keeps it), so each of its new connections resumes.
set -euo pipefail
run="${BENCH_WORK:-/tmp/tether-bench}/run"
seconds="${SECONDS_EACH:-5}"
ticks() { # pid -> utime+stime of it and its descendants
  local t=0 p
  for p in $(ps -e -o pid=,ppid= | awk -v r="$1" '{p[$1]=$2} END{n=1; q[1]=r; out=r; for(i=1;i<=n;i++){for(c in p) if(p[c]==q[i]){q[++n]=c; out=out" "c}} print out}'); do
    t=$((t + $(awk '{sub(/.*\) /,""); print $12+$13}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)
for sys in "$@"; do
  name=${sys%%:*} port=${sys##*:}
  read -r pid _ <"$run/pids/$name.pid"
  t0=$(ticks "$pid")
  out=$(taskset -c "${GEN_CPU:-1}" openssl s_time -connect "127.0.0.1:$port" -new -time "$seconds" 2>&1 |
    grep -E '^[0-9]+ connections in')
  t1=$(ticks "$pid")
  n=${out%% *}
  version=$(openssl s_client -connect "127.0.0.1:$port" </dev/null 2>/dev/null | sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)/\1 \2/p')
  python3 -c "import sys; n, d, hz = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); print(f'{sys.argv[4]:<16} {n:>6} handshakes, {d * 1e6 / hz / n:6.1f} us of server CPU each ({sys.argv[5]})')" \
    "$n" "$((t1 - t0))" "$hz" "$name" "$version"
done
