#!/usr/bin/env bash
# The partition drill: build the image, start the 5-node cluster, check it,
# cut two nodes off, check both sides, heal, check convergence, kill a node,
# check failover, revoke a node's certificate, tear everything down. Checks
# Redis through an upstream listener and n1's gateway from the host on the way. Every wait is bounded; cleanup runs
# whatever happens. Exit code 0 only if every check passed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
project="gossamer-drill"
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -p "$project")
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose -p "$project")
else
    echo "FAIL: neither 'docker compose' nor 'docker-compose' is installed"
    exit 1
fi
network="${project}_mesh"
failures=0
started=$SECONDS

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
info() { echo "---- [$((SECONDS - started))s] $*"; }

cleanup() {
    info "tearing down"
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
    docker network rm "$network" >/dev/null 2>&1 || true
}
trap cleanup EXIT

cid() { "${compose[@]}" ps -q "$1"; }
# Runs the gossamer binary inside node $1's container.
g() { local c; c="$(cid "$1")"; shift; docker exec "$c" /gossamer "$@"; }

# alive_count NODE -> how many members NODE lists as alive
alive_count() {
    g "$1" members --json 2>/dev/null | python3 -c \
        'import sys,json; print(sum(1 for m in json.load(sys.stdin) if m["state"]=="alive"))' 2>/dev/null || echo 0
}
state_of() {
    g "$1" members --json 2>/dev/null | python3 -c \
        'import sys,json; print(next((m["state"] for m in json.load(sys.stdin) if m["name"]==sys.argv[1]), "none"))' "$2" 2>/dev/null || echo none
}
passing_web() {
    g "$1" service web --json 2>/dev/null | python3 -c \
        'import sys,json; print(sum(1 for i in json.load(sys.stdin) if i["health"]=="passing"))' 2>/dev/null || echo 0
}
versions() {
    g "$1" services --json 2>/dev/null | python3 -c \
        'import sys,json; d=json.load(sys.stdin)["nodes"]; print(sorted((k,v["version"]) for k,v in d.items()))' 2>/dev/null
}
# route_version NODE -> the version of route document `web` NODE holds
route_version() {
    g "$1" config get route web --json 2>/dev/null | python3 -c \
        'import sys,json; print(json.load(sys.stdin)["version"])' 2>/dev/null || echo none
}
# route_everywhere VERSION NODE... -> whether every NODE holds that version
route_everywhere() {
    local want=$1 n; shift
    for n in "$@"; do [ "$(route_version "$n")" = "$want" ] || return 1; done
}
# wait_until SECONDS DESCRIPTION COMMAND... : polls COMMAND until it succeeds.
wait_until() {
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    while (( SECONDS < deadline )); do
        if "$@"; then pass "$what ($((SECONDS - started))s)"; return 0; fi
        sleep 1
    done
    fail "$what: not true within ${limit}s"
    return 1
}
# load NODE SECONDS -> JSON report of loadgen through NODE's proxy
load() { g "$1" loadgen --rate 40 --keys 200 --duration "$2" --json 2>/dev/null | tail -1; }
field() { python3 -c 'import sys,json; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2" 2>/dev/null; }

all_see() {  # all_see NODES... -> every listed node sees all of them alive and the expected web count
    local want=$1; shift
    for n in "$@"; do
        [ "$(alive_count "$n")" -ge "$want" ] || return 1
        [ "$(passing_web "$n")" -ge "$want" ] || return 1
    done
}
minority_sees_cut() {  # n4 no longer lists any other node alive (suspect or down)
    for m in n1 n2 n3 n5; do
        case "$(state_of n4 "$m")" in suspect|down) ;; *) return 1 ;; esac
    done
}
majority_sees_cut() {
    for n in n1 n2 n3; do for m in n4 n5; do
        [ "$(state_of "$n" "$m")" = down ] || return 1
    done; done
}
survivors_see_n3_down() {
    for n in n1 n2 n4 n5; do [ "$(state_of "$n" n3)" = down ] || return 1; done
}
others_see_n5_revoked() {
    for n in n1 n2 n4; do [ "$(state_of "$n" n5)" = revoked ] || return 1; done
}
redis_passing() {
    [ "$(g "$1" service redis --json 2>/dev/null | python3 -c \
        'import sys,json; print(sum(1 for i in json.load(sys.stdin) if i["health"]=="passing"))' 2>/dev/null)" = 1 ]
}
catalogs_agree() {
    local first; first="$(versions n1)"
    [ -n "$first" ] || return 1
    for n in n2 n3 n4 n5; do [ "$(versions "$n")" = "$first" ] || return 1; done
}

info "building the image (static binary, FROM scratch, no registry)"
if ! ./build-image.sh; then fail "image build"; exit 1; fi
if ! ./build-redis-image.sh; then fail "redis image build"; exit 1; fi
./gen-pki.sh || { fail "certificates"; exit 1; }

info "starting the cluster"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
if ! "${compose[@]}" up -d >/dev/null 2>&1; then fail "docker-compose up"; exit 1; fi

wait_until 120 "every agent sees 5 alive members and 5 passing web instances" \
    all_see 5 n1 n2 n3 n4 n5
wait_until 30 "catalogs agree on every node" catalogs_agree

info "traffic through n1"
report="$(load n1 5)"
echo "     $report"
if [ "$(field "$report" 'failed')" = "0" ] && [ "$(field "$report" 'len(by_instance)')" = "5" ]; then
    pass "traffic through n1: no failures, all 5 instances answered"
else
    fail "traffic through n1: $report"
fi

info "Redis through the mesh: redis-cli next to n1, via n1's upstream listener to n2"
wait_until 30 "n1 lists the redis instance on n2 passing" redis_passing n1
redis_cli() {
    docker run --rm --network "container:$(cid n1)" --entrypoint /usr/bin/redis-cli redis:local -p 6380 "$@" 2>&1
}
if [ "$(redis_cli ping)" = PONG ] && [ "$(redis_cli set mesh gossamer)" = OK ] \
    && [ "$(redis_cli get mesh)" = gossamer ]; then
    pass "redis-cli ping, set and get through the mesh"
else
    fail "redis through the mesh: ping gave $(redis_cli ping)"
fi

info "the gateway on n1, from the host: an ingress document routes shop.local/api to web"
cat > pki/drill-ingress.toml <<'TOML'
[[ingress]]
name = "drill"
[[ingress.route]]
hosts = ["shop.local"]
path = "/api"
strip_prefix = true
service = "web"
TOML
gateway() {
    curl -s --max-time 5 -H 'Host: shop.local' "http://127.0.0.1:18480$1" 2>/dev/null
}
gateway_serves() { gateway /api/cart | grep -q '"path":"/cart"'; }
if g n1 config apply /pki/drill-ingress.toml --operator-cert /pki/operators/drill.pem \
        --operator-key /pki/operators/drill.key >/dev/null; then
    wait_until 15 "curl on the host reaches web through n1's gateway (/api/cart arrives as /cart)" gateway_serves
    missing="$(curl -s --max-time 5 -H 'Host: shop.local' http://127.0.0.1:18480/other)"
    if [ "$missing" = "gossamer: no route for host shop.local path /other" ]; then
        pass "a path with no route gets 404 naming host and path"
    else
        fail "no-route answer: $missing"
    fi
else
    fail "config apply of the ingress document on n1"
fi

info "golden signals: gossamer stat --mesh on n1 merges what all 5 agents saw"
mesh_stats() {
    g n1 stat --mesh --window 60s --service web --json 2>/dev/null | python3 -c '
import sys, json
a = json.load(sys.stdin)
rows = [r for r in a["rows"] if r["direction"] == "inbound" and "route" not in r]
print(len(a["nodes"]), rows[0]["requests"] if rows else 0)' 2>/dev/null || echo "0 0"
}
stats_from_all() { set -- $(mesh_stats); [ "$1" = 5 ] && [ "$2" -gt 0 ]; }
wait_until 15 "gossamer stat --mesh answers for 5 nodes with web's inbound requests" stats_from_all
echo "     nodes, inbound requests to web in the last minute: $(mesh_stats)"

info "cutting n4 and n5 off the network"
docker network disconnect "$network" "$(cid n4)"
docker network disconnect "$network" "$(cid n5)"
wait_until 30 "n1, n2, n3 list n4 and n5 down" majority_sees_cut
report="$(load n1 5)"
echo "     majority side: $report"
if [ "$(field "$report" 'failed')" = "0" ] && [ "$(field "$report" 'sorted(by_instance)')" = "['web1', 'web2', 'web3']" ]; then
    pass "majority side keeps serving from web1..web3"
else
    fail "majority side: $report"
fi
# n4 routes around a peer once it suspects it; until then a request to that
# peer's instance waits for its timeout.
wait_until 30 "cut-off n4 lists every other node suspect or down" minority_sees_cut
report="$(load n4 3)"
echo "     n4 alone: $report"
if [ "$(field "$report" 'failed')" = "0" ] && [ "$(field "$report" 'sorted(by_instance)')" = "['web4']" ]; then
    pass "cut-off n4 keeps serving its own instance"
else
    fail "cut-off n4: $report"
fi

info "applying a route document on the majority side, during the partition"
# It only marks answers: the failover check below relies on the agents'
# own timeouts and retries, which a route's would replace.
cat > pki/drill-route.toml <<'TOML'
[[route]]
name = "web"
[[route.rule]]
match = { path = { prefix = "/" } }
response_headers = { set = { x-drill = "partition" } }
TOML
if g n1 config apply /pki/drill-route.toml --operator-cert /pki/operators/drill.pem \
        --operator-key /pki/operators/drill.key >/dev/null; then
    wait_until 15 "route web version 1 on n1, n2, n3" route_everywhere 1 n1 n2 n3
else
    fail "config apply on n1"
fi
if [ "$(route_version n4)" = "none" ]; then
    pass "cut-off n4 does not hold it yet"
else
    fail "cut-off n4 holds route web version $(route_version n4) during the partition"
fi

info "healing the partition"
docker network connect --ip 10.213.47.14 "$network" "$(cid n4)"
docker network connect --ip 10.213.47.15 "$network" "$(cid n5)"
wait_until 60 "after healing, every agent sees 5 alive and 5 passing web instances" \
    all_see 5 n1 n2 n3 n4 n5
wait_until 30 "after healing, catalogs agree on every node" catalogs_agree
wait_until 30 "after healing, n4 and n5 hold the route document too" route_everywhere 1 n1 n2 n3 n4 n5
report="$(load n1 5)"
echo "     $report"
if [ "$(field "$report" 'failed')" = "0" ] && [ "$(field "$report" 'len(by_instance)')" = "5" ]; then
    pass "traffic balanced over 5 instances again"
else
    fail "traffic after healing: $report"
fi

info "docker kill n3"
docker kill "$(cid n3)" >/dev/null
report="$(load n1 8)"
echo "     during and after the crash: $report"
if [ "$(field "$report" 'failed')" = "0" ]; then
    pass "failover: no request through n1 failed while n3 died"
else
    fail "failover after killing n3: $report"
fi
wait_until 30 "survivors list n3 down" survivors_see_n3_down

info "revoking n5's certificate: the CA writes a CRL, n1 spreads it"
# The CA directory is written from the host side, like gen-pki.sh does.
if docker run --rm --user "$(id -u):$(id -g)" -v "$here/pki:/pki" gossamer:local \
        cert revoke --ca-dir /pki/ca --name n5 >/dev/null \
    && chmod a+r pki/ca/crl.pem \
    && g n1 config apply /pki/ca/crl.pem --operator-cert /pki/operators/drill.pem \
        --operator-key /pki/operators/drill.key >/dev/null; then
    wait_until 10 "n1, n2 and n4 list n5 revoked" others_see_n5_revoked
    report="$(load n1 5)"
    echo "     after the revocation: $report"
    if [ "$(field "$report" 'failed')" = "0" ] && [ "$(field "$report" "'web5' in by_instance")" = "False" ]; then
        pass "n5's instance takes no traffic, nothing failed"
    else
        fail "traffic after revoking n5: $report"
    fi
else
    fail "cert revoke or config apply of the CRL"
fi

echo
if (( failures == 0 )); then
    echo "PASS: drill complete in $((SECONDS - started))s"
    exit 0
fi
echo "FAIL: $failures check(s) failed ($((SECONDS - started))s)"
exit 1
