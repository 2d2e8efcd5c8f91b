#!/usr/bin/env bash
# Makes the mesh CA and one certificate per compose node in ./pki, using the
# image itself. Run once before `docker compose up` (the drill does it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pki="$here/pki"
if [ -f "$pki/ca/ca.pem" ]; then
    echo "$pki already holds a CA; remove it to start over"
    exit 0
fi
mkdir -p "$pki"
run() { docker run --rm --user "$(id -u):$(id -g)" -v "$pki:/pki" gossamer:local "$@"; }
run ca init --dir /pki/ca >/dev/null
for n in n1 n2 n3 n4 n5; do
    # Each node hosts one instance of web: its certificate says so, and the
    # other agents refuse any other service it might claim.
    services=(--service web)
    # n2 also hosts Redis (a TCP service).
    [ "$n" = n2 ] && services+=(--service redis)
    run cert issue --ca-dir /pki/ca --name "$n" "${services[@]}" --out /pki/certs >/dev/null
done
# An operator certificate signs configuration documents (the drill applies
# one during a partition).
run cert issue --ca-dir /pki/ca --operator drill --out /pki/operators >/dev/null
# The agents run as an unprivileged user in the containers: let them read.
chmod -R a+rX "$pki"
echo "wrote $pki (CA, certificates for n1..n5, operator certificate drill)"
