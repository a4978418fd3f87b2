#!/usr/bin/env bash
# Builds the images `outrigger:dev` and `outrigger-mesh-app:dev` (the compose mesh's demo
# service) from fully static binaries compiled on this machine: no base image is pulled.
#
#   bash docker/build.sh             # OUTRIGGER_TAG=... for another tag
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
target=x86_64-unknown-linux-gnu
tag="${OUTRIGGER_TAG:-dev}"
# +crt-static links glibc statically; naming the target keeps build scripts and proc macros
# (which must stay dynamic) out of it.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$target" \
  --bin outrigger --example mesh_app
out="target/$target/release"
stage="target/docker"
rm -rf "$stage"
mkdir -p "$stage/rootfs/etc/ssl/certs" "$stage/rootfs/etc/outrigger" "$stage/data/mesh" "$stage/app"
cp "$out/outrigger" "$stage/rootfs/outrigger"
cp "$out/examples/mesh_app" "$stage/app/mesh_app"
if command -v strip >/dev/null 2>&1; then
  strip "$stage/rootfs/outrigger" "$stage/app/mesh_app"
fi
cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$stage/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$stage/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$stage/rootfs/etc/group"
cp config/outrigger.yaml "$stage/rootfs/etc/outrigger/outrigger.yaml"
docker build -q -t "outrigger:$tag" -f docker/Dockerfile "$stage" >/dev/null
docker build -q -t "outrigger-mesh-app:$tag" -f docker/Dockerfile.app "$stage/app" >/dev/null
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^outrigger(-mesh-app)?:$tag "
