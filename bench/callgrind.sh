#!/usr/bin/env bash
# Instructions per request on the calling agent, counted by callgrind: a
# figure that does not move with the machine's load, for comparing what a
# feature adds to the request path on a shared, noisy machine.
#
#   bash bench/callgrind.sh BIN MODE [REQUESTS]
#
# MODE: plain (no access log, no tracing), log (access log of every
# request to a file), trace (tracing at 1 %, spans posted to a sink in the
# script),
# both. MODE applies to both agents, as bench.py's P5 sets them. Agent B
# and an nginx upstream run normally; agent A (one worker thread) runs
# under valgrind. After a warm-up of 500 requests, h2load
# sends REQUESTS (2,000) HTTP/1.1 requests over 8 connections through A,
# and the script prints A's instructions per request over that window
# (background work included: compare runs, not single figures; two runs of
# the same binary differ by about 2 %). With H2C=1 in the environment the
# requests are HTTP/2 without TLS (prior knowledge), 10 streams at once on
# each connection, as bench.py's h2c path sends them. With PROFILE=b, agent
# B (the one that owns the instance) is counted instead of A. With
# GATEWAY=1 the requests are HTTPS (HTTP/1.1, keep-alive) into agent A's
# gateway listener with one `ingress` route to the service, as bench.py's
# G1 path sends them.
#
# With FLAME=FILE.svg the profiled agent runs natively instead, and `perf
# record -e cpu-clock` (a software clock, so no hardware counters are
# needed) samples it with DWARF call graphs while it serves REQUESTS;
# inferno (cargo install inferno) folds the samples into a flamegraph.
# With SYSCALLS=1 the profiled agent runs natively under `strace -c -f`
# for the REQUESTS, and the script prints its system calls per request by
# call (strace slows the agent, but the counts are what it reports).
set -euo pipefail

BIN=$(realpath "${1:?usage: callgrind.sh BIN MODE [REQUESTS]}")
MODE=${2:?plain, log, trace or both}
N=${3:-2000}
for tool in valgrind:valgrind h2load:nghttp2-client nginx:nginx-light; do
    command -v "${tool%%:*}" >/dev/null || apt-get install -y -q "${tool#*:}" >/dev/null ||
        { echo "callgrind.sh: needs ${tool#*:} (apt-get install ${tool#*:})" >&2; exit 1; }
done

D=$(mktemp -d /tmp/gossamer-callgrind.XXXX)
chmod 755 "$D"
pids=()
A=
# The profiled agent's profile is written by then: it is killed rather
# than left to drain under valgrind.
cleanup() {
    [ -n "$A" ] && kill -9 "$A" 2>/dev/null
    kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
read -r UP PB AB XB PA AA XA SINK GW < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

"$BIN" ca init --dir "$D/ca" >/dev/null
for n in ga gb; do
    "$BIN" cert issue --ca-dir "$D/ca" --name $n --service '*' --out "$D/certs" >/dev/null
done
mkdir -p "$D/www"
head -c 1024 /dev/zero | tr '\0' x >"$D/www/1k"
cat >"$D/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $D/nginx.pid; error_log $D/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $D/b; proxy_temp_path $D/p; fastcgi_temp_path $D/f;
    uwsgi_temp_path $D/u; scgi_temp_path $D/s;
    server { listen 127.0.0.1:$UP; root $D/www; }
}
EOF
nginx -p "$D" -c "$D/nginx.conf" &
pids+=($!)

printf '[[service]]\nid = "bench-b"\nname = "bench"\nport = %s\n' "$UP" >"$D/gb.toml"
: >"$D/ga.toml"
case $MODE in
plain | trace) ;;
log | both)
    for n in a b; do
        printf '[access_log]\nenabled = true\npath = "%s/access-%s.log"\n\n' "$D" $n >>"$D/g$n.toml"
    done
    ;;
*) echo "callgrind.sh: MODE is plain, log, trace or both" >&2; exit 2 ;;
esac
case $MODE in
trace | both)
    # An OTLP/HTTP endpoint that takes every batch.
    python3 -c '
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()' "$SINK" &
    pids+=($!)
    for n in a b; do
        printf '[tracing]\nendpoint = "http://127.0.0.1:%s/v1/traces"\nsample = 0.01\n' "$SINK" >>"$D/g$n.toml"
    done
    ;;
esac

if [ "${GATEWAY:-0}" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.test \
        -addext subjectAltName=DNS:bench.test -keyout "$D/public.key" -out "$D/public.pem" 2>/dev/null
    printf '[[ingress.listener]]\nlisten = "127.0.0.1:%s"\ntls = [{ cert = "%s/public.pem", key = "%s/public.key" }]\n' \
        "$GW" "$D" "$D" >>"$D/ga.toml"
fi

common=(--ca "$D/ca/ca.pem" --log-level warn --threads 1)
callgrind=(valgrind --tool=callgrind --callgrind-out-file="$D/callgrind.out" --instr-atstart=no)
if [ -n "${FLAME:-}" ]; then
    for tool in perf inferno-collapse-perf inferno-flamegraph; do
        command -v $tool >/dev/null || { echo "callgrind.sh: FLAME needs $tool (linux-perf; cargo install inferno)" >&2; exit 1; }
    done
    FLAME=$(realpath -m "$FLAME")
    callgrind=()
fi
if [ "${SYSCALLS:-0}" = 1 ]; then
    command -v strace >/dev/null || apt-get install -y -q strace >/dev/null ||
        { echo "callgrind.sh: SYSCALLS needs strace (apt-get install strace)" >&2; exit 1; }
    callgrind=()
fi
case ${PROFILE:-a} in
a) on_a=("${callgrind[@]}") on_b=() ;;
b) on_a=() on_b=("${callgrind[@]}") ;;
*) echo "callgrind.sh: PROFILE is a or b" >&2; exit 2 ;;
esac
"${on_b[@]}" "$BIN" agent --name gb --bind "127.0.0.1:$PB" --admin "127.0.0.1:$AB" --proxy "127.0.0.1:$XB" \
    --cert "$D/certs/gb.pem" --key "$D/certs/gb.key" --data-dir "$D/data-b" --config "$D/gb.toml" \
    "${common[@]}" >"$D/b.log" 2>&1 &
pids+=($!)
[ "${PROFILE:-a}" = b ] && A=$!
"${on_a[@]}" "$BIN" agent --name ga --bind "127.0.0.1:$PA" --admin "127.0.0.1:$AA" --proxy "127.0.0.1:$XA" \
    --seed "127.0.0.1:$PB" --cert "$D/certs/ga.pem" --key "$D/certs/ga.key" --data-dir "$D/data-a" \
    --config "$D/ga.toml" "${common[@]}" >"$D/a.log" 2>&1 &
pids+=($!)
[ "${PROFILE:-a}" = a ] && A=$!

url="http://127.0.0.1:$XA/1k"
for _ in $(seq 1 120); do
    if curl -s -H 'Host: bench' "$url" 2>/dev/null | grep -q xxxx; then break; fi
    sleep 1
done
curl -s -H 'Host: bench' "$url" | grep -q xxxx || { echo "callgrind.sh: no answer through agent A" >&2; exit 1; }
if [ "${H2C:-0}" = 1 ]; then proto=(-m 10); else proto=(--h1); fi
if [ "${GATEWAY:-0}" = 1 ]; then
    "$BIN" cert issue --ca-dir "$D/ca" --operator bench --out "$D/operators" >/dev/null
    printf '[[ingress]]\nname = "bench"\n[[ingress.route]]\nhosts = ["*"]\nservice = "bench"\n' >"$D/ingress.toml"
    "$BIN" config apply "$D/ingress.toml" --operator-cert "$D/operators/bench.pem" \
        --operator-key "$D/operators/bench.key" --admin "127.0.0.1:$AA" >/dev/null
    url="https://127.0.0.1:$GW/1k"
    for _ in $(seq 1 60); do
        if curl -sk "$url" 2>/dev/null | grep -q xxxx; then break; fi
        sleep 1
    done
    curl -sk "$url" | grep -q xxxx || { echo "callgrind.sh: no answer through agent A's gateway" >&2; exit 1; }
fi
h2load "${proto[@]}" -n 500 -c 8 -t 1 -H ':authority: bench' "$url" >/dev/null
if [ -n "${FLAME:-}" ]; then
    perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$A" -o "$D/perf.data" 2>"$D/perf.log" &
    perf=$!
    sleep 1
elif [ "${SYSCALLS:-0}" = 1 ]; then
    strace -c -f -q -p "$A" -o "$D/strace.txt" &
    perf=$!
    sleep 1
else
    callgrind_control -i on "$A" >/dev/null 2>&1
fi
h2load "${proto[@]}" -n "$N" -c 8 -t 1 -H ':authority: bench' "$url" >"$D/h2load.txt"
if [ -n "${FLAME:-}" ] || [ "${SYSCALLS:-0}" = 1 ]; then
    kill -INT $perf
    wait $perf || true
else
    # The controls can fail when valgrind is busy; the dump is waited for
    # below, so neither may end the script silently.
    callgrind_control -i off "$A" >/dev/null 2>&1 || true
    for _ in $(seq 1 30); do
        callgrind_control -d "$A" >/dev/null 2>&1 || true
        sleep 1
        grep -qs '^totals: ' "$D"/callgrind.out.* && break
    done
    grep -qs '^totals: ' "$D"/callgrind.out.* || { echo "callgrind.sh: no profile dumped" >&2; exit 1; }
fi
ok=$(sed -n 's/.* \([0-9]*\) succeeded.*/\1/p' "$D/h2load.txt")
[ "$ok" = "$N" ] || { echo "callgrind.sh: $ok of $N requests succeeded" >&2; exit 1; }
side=$(echo "${PROFILE:-a}" | tr ab AB)
if [ -n "${FLAME:-}" ]; then
    perf script -i "$D/perf.data" 2>/dev/null | inferno-collapse-perf >"$D/folded.txt"
    inferno-flamegraph --title "agent $side, $MODE, $N requests" <"$D/folded.txt" >"$FLAME"
    echo "$MODE: flamegraph of agent $side in $FLAME ($(wc -l <"$D/folded.txt") stacks; samples in $D)"
    exit 0
fi
if [ "${SYSCALLS:-0}" = 1 ]; then
    echo "$MODE: system calls per request on agent $side ($N requests; strace's table in $D/strace.txt)"
    awk -v n="$N" '$1 ~ /^[0-9.]+$/ && NF >= 5 && $NF != "total" { printf "  %-16s %7.2f\n", $NF, $4 / n; t += $4 }
        END { printf "  %-16s %7.2f\n", "all", t / n }' "$D/strace.txt"
    exit 0
fi
total=0
for f in "$D"/callgrind.out*; do
    t=$(sed -n 's/^totals: //p' "$f")
    total=$((total + ${t:-0}))
done
echo "$MODE: $((total / N)) instructions per request on agent $side ($N requests; profile in $D)"
