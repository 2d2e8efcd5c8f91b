#!/usr/bin/env bash
# Data-plane benchmark: Gossamer against direct, an HAProxy mTLS pair and an
# nginx mTLS pair, in one run on this machine. Installs what it needs
# (haproxy and nginx from Debian, oha from crates.io, matplotlib from PyPI),
# builds Gossamer in release mode, then runs bench.py.
#
#   bench/run.sh                 # full run (about 15 minutes)
#   bench/run.sh --quick         # one repetition, shorter phases
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
tools="${GOSSAMER_BENCH_TOOLS:-$root/target/bench-tools}"

need_apt=()
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v nginx >/dev/null || need_apt+=(nginx)
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
if ((${#need_apt[@]})); then
    echo "installing ${need_apt[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! [ -x "$tools/bin/oha" ]; then
    echo "installing oha (load generator) from crates.io"
    cargo install oha --locked --version 1.16.0 --root "$tools"
fi
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    echo "installing matplotlib from PyPI"
    python3 -m pip install -q matplotlib
fi
echo "building gossamer (release)"
(cd "$root" && cargo build --release --locked -p gossamer-node)
# The code layout the release build links in (node/build.rs) names
# functions by their hashed symbols; say so when it no longer fits.
python3 "$here/layout.py" --gossamer "$root/target/release/gossamer" --check || true
exec python3 "$here/bench.py" --gossamer "$root/target/release/gossamer" --oha "$tools/bin/oha" \
    --out "$root/docs/bench" --tcp --gateway --h2c "$@"
