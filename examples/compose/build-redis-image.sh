#!/usr/bin/env bash
# Builds a `redis:local` image without any registry: Debian's redis-server
# and redis-cli (installed on this machine if missing) with exactly the
# shared libraries they load, in a FROM-scratch image.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "installing redis-server and redis-tools from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/usr/bin" "$ctx/data"
for bin in redis-server redis-cli; do
    cp -L "$(command -v "$bin")" "$ctx/usr/bin/$bin"
    # Every library the binary loads, and the loader, at the same paths.
    ldd "$(command -v "$bin")" | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$ctx$(dirname "$lib")"
        cp -L "$lib" "$ctx$lib"
    done
done
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY . /
USER 65534:65534
ENTRYPOINT ["/usr/bin/redis-server"]
CMD ["--bind", "127.0.0.1", "--port", "6379", "--save", "", "--appendonly", "no", "--dir", "/data"]
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q -t redis:local "$ctx" >/dev/null
echo "built redis:local ($(docker image inspect redis:local --format '{{.Size}}') bytes)"
