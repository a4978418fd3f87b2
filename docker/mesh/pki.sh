#!/usr/bin/env bash
# Makes the compose mesh's demo PKI: one CA (in MESH_DIR/ca) and a certificate per sidecar, in
# MESH_DIR/INSTANCE/pki (ca.pem, cert.pem, key.pem), beside the sidecar's config. Demo material
# only: made fresh on each machine, never committed, keys readable by the image's non-root user.
# Run again to rotate (the sidecars pick new files up).
#
#   bash docker/mesh/pki.sh            # MESH_DIR is docker/mesh
#   bash docker/mesh/pki.sh MESH_DIR
set -euo pipefail
out="${1:-$(dirname "$0")}"
cd "$out"
mkdir -p ca
if [ ! -f ca/ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=outrigger demo mesh CA" -keyout ca/ca.key -out ca/ca.pem 2>/dev/null
fi
# instance service
for pair in a-1:a b-1:b b-2:b c-1:c; do
  inst="${pair%%:*}" svc="${pair##*:}"
  mkdir -p "$inst/pki"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$inst" \
    -keyout "$inst/pki/key.tmp" -out "$inst/pki/csr.pem" 2>/dev/null
  # The key as PKCS#8, which every TLS stack reads.
  openssl pkcs8 -topk8 -nocrypt -in "$inst/pki/key.tmp" -out "$inst/pki/key.pem"
  # Names: the Raft member address (mesh TLS), the service (what callers check) and the
  # SPIFFE identity inbound listeners allow.
  printf 'subjectAltName=DNS:%s.raft,DNS:%s.mesh,URI:spiffe://outrigger.demo/%s\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$inst" "$svc" "$svc" > "$inst/pki/ext.cnf"
  openssl x509 -req -in "$inst/pki/csr.pem" -CA ca/ca.pem -CAkey ca/ca.key -CAcreateserial -days 365 \
    -extfile "$inst/pki/ext.cnf" -out "$inst/pki/cert.pem" 2>/dev/null
  cp ca/ca.pem "$inst/pki/ca.pem"
  rm -f "$inst/pki/key.tmp" "$inst/pki/csr.pem" "$inst/pki/ext.cnf"
  chmod 644 "$inst"/pki/*.pem
done
echo "demo PKI in $out/*/pki"
