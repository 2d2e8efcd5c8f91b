#!/bin/sh
# Keeps an nginx upstream block in step with a Gossamer service's passing
# instances. Run it as a watch handler:
#
#   gossamer watch --type service,health --service web -- /etc/gossamer/nginx-upstreams.sh
#
# or for the agent's lifetime, in its config:
#
#   [[watch]]
#   types = ["service", "health"]
#   service = "web"
#   command = ["/etc/gossamer/nginx-upstreams.sh"]
#
# It writes $OUT_DIR/gossamer-<service>.conf (an `upstream <service> { ... }`
# block listing every passing instance), atomically, and reloads nginx only
# when the file changed. With no passing instance it keeps a `down` server
# so nginx still loads the file.
#
# Environment: GOSSAMER_EVENT_SERVICE (set by gossamer watch), GOSSAMER_ADMIN
# (default 127.0.0.1:7947), OUT_DIR (default /etc/nginx/conf.d), RELOAD
# (default "nginx -s reload").
set -eu

service=${GOSSAMER_EVENT_SERVICE:?run me from gossamer watch, which sets GOSSAMER_EVENT_SERVICE}
admin=${GOSSAMER_ADMIN:-127.0.0.1:7947}
out_dir=${OUT_DIR:-/etc/nginx/conf.d}
reload=${RELOAD:-nginx -s reload}
gossamer=${GOSSAMER_BIN:-gossamer}

case $service in
    *[!A-Za-z0-9._-]*) echo "nginx-upstreams: odd service name: $service" >&2; exit 1 ;;
esac

target="$out_dir/gossamer-$service.conf"
tmp=$(mktemp "$out_dir/.gossamer-$service.XXXXXX")
trap 'rm -f "$tmp"' EXIT

"$gossamer" service "$service" --json --admin "$admin" | python3 -c '
import json, sys
service = sys.argv[1]
passing = sorted(
    "%s:%s" % (i["address"], i["port"]) for i in json.load(sys.stdin) if i["health"] == "passing"
)
print("# written by nginx-upstreams.sh from the Gossamer catalog; do not edit")
print("upstream %s {" % service)
for addr in passing:
    print("    server %s;" % addr)
if not passing:
    print("    server 127.0.0.1:9 down;  # no passing instance")
print("}")
' "$service" > "$tmp"

if [ -f "$target" ] && cmp -s "$tmp" "$target"; then
    exit 0
fi
chmod 0644 "$tmp"
mv "$tmp" "$target"
trap - EXIT
$reload
