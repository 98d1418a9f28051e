# shellcheck shell=bash
# Sourced by scripts/stack.
#
# TLS is always on, next to the plaintext listeners. `up` creates once per state folder, with
# openssl, a private CA and, signed by it, a server certificate for localhost and 127.0.0.1 and
# a client certificate (EC P-256 keys, PKCS#8 PEM), in <state>/tls/: ca.pem, server.pem,
# server-key.pem, client.pem, client-key.pem (the keys readable by the service user and root
# only); it issues a certificate again when its file is missing or no longer verifies.
#   PostgreSQL  ssl = on: DATABASE_TLS_URL (sslmode=verify-full, sslrootcert=<state>/tls/ca.pem)
#   RabbitMQ    AMQPS listener, no client certificate asked: RABBITMQ_TLS_URL (cacertfile=<CA>)
#   search      stunnel, running as the service user, relays HTTPS to the node:
#               ELASTICSEARCH_TLS_URL, and ELASTICSEARCH_MTLS_URL, which requires a client
#               certificate signed by the CA (BENALSAM_TLS_CLIENT_CERT, BENALSAM_TLS_CLIENT_KEY)
# `up` checks each endpoint with certificate verification against the CA. On a state folder
# made before TLS, `up` adds it: PostgreSQL reloads its configuration; a running RabbitMQ
# opens its TLS listener only at its next start, and `up` and `status` say so until then
# (restart it when nobody needs it: scripts/stack rabbitmqctl shutdown; scripts/stack up).

tls_openssl() { openssl "$@" >>"$TLS_DIR/openssl.log" 2>&1 || die "TLS: openssl $1 failed; see $TLS_DIR/openssl.log"; }

# A new EC P-256 key in PKCS#8 PEM, readable by its owner only.
tls_new_key() {
  local mask; mask=$(umask)
  umask 077
  tls_openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
  umask "$mask"
}

# Whether a certificate and its key are there, and the certificate verifies against the CA.
tls_valid() { # cert key purpose
  [ -s "$1" ] && [ -s "$2" ] \
    && openssl verify -CAfile "$TLS_CA" -purpose "$3" "$1" >/dev/null 2>&1
}

# Issues a certificate signed by the CA for a new key.
tls_issue() { # common-name extensions-section cert key
  local cn=$1 section=$2 cert=$3 key=$4
  say "TLS: issuing the $section certificate $cert"
  rm -f "$cert" "$key"
  tls_new_key "$key"
  tls_openssl req -new -config "$TLS_DIR/openssl.cnf" -key "$key" -subj "/CN=$cn" -out "$TLS_DIR/$section.csr"
  tls_openssl x509 -req -in "$TLS_DIR/$section.csr" -CA "$TLS_CA" -CAkey "$TLS_CA_KEY" \
    -set_serial "0x$(openssl rand -hex 16)" -days 3650 -sha256 \
    -extfile "$TLS_DIR/openssl.cnf" -extensions "$section" -out "$cert"
  rm -f "$TLS_DIR/$section.csr"
  chmod 644 "$cert"
}

# A private CA, a server certificate for localhost and 127.0.0.1, and a client certificate:
# made once per state folder, issued again only when a file is missing or does not verify.
# A new server certificate reaches PostgreSQL and stunnel with a reload; RabbitMQ reads it
# at its next start (or when Erlang's certificate cache expires, within minutes).
ensure_tls() {
  TLS_SERVER_ISSUED=''
  mkdir -p "$TLS_DIR"
  cat >"$TLS_DIR/openssl.cnf" <<'EOF'
# Written by scripts/stack; the extensions of the stack's certificates.
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  if [ ! -s "$TLS_CA" ] || [ ! -s "$TLS_CA_KEY" ] \
    || ! openssl verify -CAfile "$TLS_CA" "$TLS_CA" >/dev/null 2>&1; then
    say "TLS: creating a private CA in $TLS_DIR"
    rm -f "$TLS_CA" "$TLS_CA_KEY" "$TLS_SERVER_CERT" "$TLS_CLIENT_CERT"
    tls_new_key "$TLS_CA_KEY"
    tls_openssl req -new -x509 -config "$TLS_DIR/openssl.cnf" -extensions ca -key "$TLS_CA_KEY" \
      -subj "/CN=benalsam-stack $STACK_NAME CA" -set_serial "0x$(openssl rand -hex 16)" \
      -days 3650 -sha256 -out "$TLS_CA"
    chmod 644 "$TLS_CA"
  fi
  if ! tls_valid "$TLS_SERVER_CERT" "$TLS_SERVER_KEY" sslserver; then
    tls_issue localhost server "$TLS_SERVER_CERT" "$TLS_SERVER_KEY"
    TLS_SERVER_ISSUED=1
  fi
  tls_valid "$TLS_CLIENT_CERT" "$TLS_CLIENT_KEY" sslclient \
    || tls_issue benalsam-client client "$TLS_CLIENT_CERT" "$TLS_CLIENT_KEY"
  own_state
}
