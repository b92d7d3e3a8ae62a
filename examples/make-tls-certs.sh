#!/bin/sh
# Make a small X.509 PKI to try pfnbd's TLS with: a certificate authority, a server
# certificate and a client certificate, in the files GnuTLS-based peers (QEMU, libnbd,
# nbdkit, qemu-nbd) look for.
#
#   make-tls-certs.sh DIR [SERVER_NAME ...]
#
# SERVER_NAMEs are the DNS names and IP addresses clients reach the server by
# (default: localhost 127.0.0.1 ::1). QEMU checks the host of a TCP connection
# against them; over a Unix socket it checks only that the CA signed the certificate.
# It writes:
#   DIR/ca-cert.pem, DIR/ca-key.pem       the CA (keep its key somewhere safe)
#   DIR/server/  ca-cert.pem server-cert.pem server-key.pem
#                for `pfnbd serve --tls on|require --tls-certificates DIR/server`
#   DIR/client/  ca-cert.pem client-cert.pem client-key.pem
#                for QEMU's `-object tls-creds-x509,dir=DIR/client,endpoint=client`
#                and libnbd's `nbds+unix://...&tls-certificates=DIR/client`
# Certificates are valid for $DAYS days (default 365); the client certificate's name
# is $CLIENT_NAME (default pfnbd-client). Needs openssl (Debian package openssl).
set -eu

[ $# -ge 1 ] || { sed -n '6p' "$0" >&2; exit 2; }
dir=$1
shift
[ $# -gt 0 ] || set -- localhost 127.0.0.1 ::1
days=${DAYS:-365}

alt_names=""
for name in "$@"; do
    case $name in
        *:*) kind=IP ;;  # IPv6
        *[!0-9.]*) kind=DNS ;;
        *) kind=IP ;;  # IPv4
    esac
    alt_names="${alt_names:+$alt_names,}$kind:$name"
done

umask 077  # keys readable by their owner only
mkdir -p "$dir/server" "$dir/client"
openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=pfnbd CA $(date +%s)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca-key.pem" -out "$dir/ca-cert.pem" 2>/dev/null

# issue ROLE COMMON_NAME EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]
issue() {
    role=$1
    extensions="$dir/$role/extensions.cnf"
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = $3"
        [ -z "${4:-}" ] || echo "subjectAltName = $4"
    } > "$extensions"
    openssl req -new -newkey rsa:2048 -nodes -subj "/CN=$2" \
        -keyout "$dir/$role/$role-key.pem" -out "$dir/$role/request.csr" 2>/dev/null
    openssl x509 -req -in "$dir/$role/request.csr" -days "$days" \
        -CA "$dir/ca-cert.pem" -CAkey "$dir/ca-key.pem" -set_serial "0x$(openssl rand -hex 16)" \
        -extfile "$extensions" -out "$dir/$role/$role-cert.pem" 2>/dev/null
    rm "$extensions" "$dir/$role/request.csr"
    cp "$dir/ca-cert.pem" "$dir/$role/ca-cert.pem"
}

issue server "$1" serverAuth "$alt_names"
issue client "${CLIENT_NAME:-pfnbd-client}" clientAuth
echo "server: $dir/server (names $alt_names)"
echo "client: $dir/client"
