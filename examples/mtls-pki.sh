#!/usr/bin/env bash
# Makes the demo certificates of examples/mtls.yaml in DIR (default: examples/mtls-pki, where the
# example looks for them, its paths being relative to its own folder):
#
#   ca.pem                        the mesh CA, trusted by both sidecars (ca.key signs)
#   web.crt, web.key              the caller's identity: spiffe://example.org/ns/shop/sa/web
#   payments.crt, payments.key    payments' sidecar: DNS payments.shop.svc and
#                                 spiffe://example.org/ns/shop/sa/payments
#
# Demo material only: made fresh on each machine, never committed. Run again to make new ones
# (the sidecar picks new files up).
#
#   bash examples/mtls-pki.sh [DIR]
set -euo pipefail
out="${1:-$(dirname "$0")/mtls-pki}"
mkdir -p "$out"
cd "$out"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
if [ ! -f ca.key ]; then
  key ca.key
  openssl req -x509 -new -key ca.key -days 3650 -subj "/CN=outrigger example mesh CA" -out ca.pem
fi
# NAME SANS
leaf() {
  key "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr"
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
leaf web "URI:spiffe://example.org/ns/shop/sa/web"
leaf payments "DNS:payments.shop.svc,URI:spiffe://example.org/ns/shop/sa/payments"
rm -f ca.srl
echo "demo certificates in $out"
