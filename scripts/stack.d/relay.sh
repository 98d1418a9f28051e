# shellcheck shell=bash
# Sourced by scripts/stack.
#
# The TLS relay in front of OpenSearch (stunnel): HTTPS, and HTTPS with client certificates.

stunnel_bin() { command -v stunnel4 || command -v stunnel; }

relay_pid() { [ -s "$RELAY_PID" ] && tr -d ' \n' <"$RELAY_PID"; }

relay_running() {
  local pid; pid=$(relay_pid) && kill -0 "$pid" 2>/dev/null && grep -q stunnel "/proc/$pid/comm" 2>/dev/null
}

write_relay_config() {
  cat <<EOF
; Written by scripts/stack: HTTPS relays in front of OpenSearch on 127.0.0.1:$SEARCH_PORT.
foreground = no
pid = $RELAY_PID
output = $RELAY_LOG
syslog = no
debug = notice
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[search-tls]
accept = 127.0.0.1:$SEARCH_TLS_PORT
connect = 127.0.0.1:$SEARCH_PORT
cert = $TLS_SERVER_CERT
key = $TLS_SERVER_KEY

; Only clients with a certificate signed by the stack's CA get through.
[search-mtls]
accept = 127.0.0.1:$SEARCH_MTLS_PORT
connect = 127.0.0.1:$SEARCH_PORT
cert = $TLS_SERVER_CERT
key = $TLS_SERVER_KEY
CAfile = $TLS_CA
verifyChain = yes
requireCert = yes
EOF
}

start_search_relay() {
  mkdir -p "$RELAY_DIR"
  local changed=$TLS_SERVER_ISSUED
  if ! cmp -s <(write_relay_config) "$RELAY_CONF"; then
    write_relay_config >"$RELAY_CONF"
    changed=1
  fi
  own_state
  if relay_running; then
    if [ -n "$changed" ]; then
      say "search TLS relay: configuration or certificate changed, reloading stunnel"
      kill -HUP "$(relay_pid)"
      sleep 1
    fi
    return 0
  fi
  ports_free "search TLS relay" "$SEARCH_TLS_PORT:BENALSAM_SEARCH_TLS_PORT" "$SEARCH_MTLS_PORT:BENALSAM_SEARCH_MTLS_PORT"
  say "starting the search TLS relay (stunnel) on 127.0.0.1:$SEARCH_TLS_PORT, and :$SEARCH_MTLS_PORT with client certificates"
  rm -f "$RELAY_PID"
  as_service "$(stunnel_bin)" "$RELAY_CONF" >"$RELAY_DIR/launcher.log" 2>&1 \
    || die "search TLS relay (stunnel) did not start; see $RELAY_LOG and $RELAY_DIR/launcher.log"
  local deadline=$((SECONDS + 10))
  until relay_running && port_busy "$SEARCH_TLS_PORT" && port_busy "$SEARCH_MTLS_PORT"; do
    [ $SECONDS -lt $deadline ] || die "search TLS relay (stunnel) does not listen on :$SEARCH_TLS_PORT and :$SEARCH_MTLS_PORT; see $RELAY_LOG"
    sleep 0.2
  done
}

# HTTPS verified against the CA on both relays; the mTLS one with the client certificate,
# and refusing a client without one.
check_search_relay() {
  local out
  out=$(curl -sS -m 10 --cacert "$TLS_CA" "$ELASTICSEARCH_TLS_URL/_cluster/health" 2>&1) || true
  [[ $out == *'"status"'* ]] \
    || die "search does not answer over verified TLS at $ELASTICSEARCH_TLS_URL: $out; see $RELAY_LOG"
  out=$(curl -sS -m 10 --cacert "$TLS_CA" --cert "$TLS_CLIENT_CERT" --key "$TLS_CLIENT_KEY" \
    "$ELASTICSEARCH_MTLS_URL/_cluster/health" 2>&1) || true
  [[ $out == *'"status"'* ]] \
    || die "search does not answer over verified TLS with the client certificate at $ELASTICSEARCH_MTLS_URL: $out; see $RELAY_LOG"
  if curl -fsS -m 10 -o /dev/null --cacert "$TLS_CA" "$ELASTICSEARCH_MTLS_URL/_cluster/health" 2>/dev/null; then
    die "search: $ELASTICSEARCH_MTLS_URL answers a client without a certificate; check verifyChain and requireCert in $RELAY_CONF"
  fi
}

stop_search_relay() {
  if relay_running; then
    say "stopping the search TLS relay (stunnel)"
    local pid; pid=$(relay_pid)
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$RELAY_PID"
}
