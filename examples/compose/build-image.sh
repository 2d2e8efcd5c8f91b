#!/usr/bin/env bash
# Builds the `gossamer:local` image without any registry: a static glibc
# binary in a FROM-scratch image, with the classic builder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target=x86_64-unknown-linux-gnu

echo "building a static gossamer binary (release, $target)"
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p gossamer-node --target "$target")

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "$root/target/$target/release/gossamer" "$ctx/gossamer"
strip "$ctx/gossamer" 2>/dev/null || true
cp "$here/Dockerfile" "$ctx/Dockerfile"
# The binary must not need anything from a base image.
if ldd "$ctx/gossamer" 2>&1 | grep -q '=>'; then
    echo "the binary is dynamically linked; refusing to build a scratch image" >&2
    exit 1
fi
DOCKER_BUILDKIT=0 docker build -q -t gossamer:local "$ctx" >/dev/null
echo "built gossamer:local ($(docker image inspect gossamer:local --format '{{.Size}}') bytes)"
