# shellcheck shell=bash
# Sourced by scripts/stack.
#
# The instance's helpers: messages, the service user, port checks, the state folder and
# its paths, the Debian packages.

say() { printf '[stack] %s\n' "$*" >&2; }

die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the user that owns the servers.
# From the state folder: the caller's folder may be closed to that user. Without fd 9, the
# lock of `up`, which a server started here would otherwise hold for its whole life.
as_service() {
  if is_root; then (cd "${STATE:-/}" 2>/dev/null || cd /; runuser -u "$SERVICE_USER" -- "$@" 9>&-); else "$@" 9>&-; fi
}

# Every port of the instance, as port:VARIABLE.
port_settings() {
  printf '%s\n' "$PG_PORT:BENALSAM_PG_PORT" "$AMQP_PORT:BENALSAM_AMQP_PORT" \
    "$AMQPS_PORT:BENALSAM_AMQPS_PORT" "$RABBIT_MGMT_PORT:BENALSAM_RABBIT_MGMT_PORT" \
    "$RABBIT_PROM_PORT:BENALSAM_RABBIT_PROM_PORT" "$RABBIT_DIST_PORT:BENALSAM_RABBIT_DIST_PORT" \
    "$SEARCH_PORT:BENALSAM_SEARCH_PORT" "$SEARCH_TRANSPORT_PORT:BENALSAM_SEARCH_TRANSPORT_PORT" \
    "$SEARCH_TLS_PORT:BENALSAM_SEARCH_TLS_PORT" "$SEARCH_MTLS_PORT:BENALSAM_SEARCH_MTLS_PORT"
}

# Dies on a bad name, or a port that is no port number or is given twice. The ports come from
# port_settings, or the function named (cluster_port_settings).
check_settings() { # [lister]
  [[ $STACK_NAME =~ ^[A-Za-z0-9_-]+$ ]] \
    || die "BENALSAM_STACK_NAME '$STACK_NAME' may hold letters, digits, '-' and '_' only (it names the RabbitMQ node)"
  local -A owner=()
  local spec port var
  while IFS= read -r spec; do
    port=${spec%%:*} var=${spec#*:}
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
      die "$var='$port' is not a port number"
    fi
    [ -z "${owner[$port]:-}" ] || die "$var and ${owner[$port]} both say port $port; give each its own"
    owner[$port]=$var
  done < <("${1:-port_settings}")
}

# Dies when one of the ports (port:VARIABLE...) is taken, naming the variable that moves it.
ports_free() { # service spec...
  local service=$1 spec; shift
  for spec in "$@"; do
    if port_busy "${spec%%:*}"; then
      die "$service: port ${spec%%:*} is taken by another server (another stack? see the header of scripts/stack); stop it, or set ${spec#*:}"
    fi
  done
}

resolve_state_dir() {
  if [ -n "${BENALSAM_STACK_DIR:-}" ]; then
    STATE=$BENALSAM_STACK_DIR
  else
    STATE=$ROOT/.stack
    if is_root && id "$SERVICE_USER" >/dev/null 2>&1; then
      mkdir -p "$STATE"
      chown "$SERVICE_USER" "$STATE"
      if ! runuser -u "$SERVICE_USER" -- test -w "$STATE" 2>/dev/null; then
        STATE=/var/lib/benalsam-stack/$(printf '%s' "$ROOT" | md5sum | cut -c1-12)
      fi
    fi
  fi
  mkdir -p "$STATE"
  if is_root && id "$SERVICE_USER" >/dev/null 2>&1; then chown "$SERVICE_USER" "$STATE"; fi
  PG_DATA=$STATE/postgres/data
  PG_RUN=$STATE/postgres/run
  PG_LOG=$STATE/postgres.log
  RABBIT_BASE=$STATE/rabbitmq
  RABBIT_LOG=$RABBIT_BASE/log/$RABBIT_NODE.log
  SEARCH_HOME=$STATE/opensearch-$OPENSEARCH_VERSION
  SEARCH_DATA=$STATE/opensearch/data
  SEARCH_LOGS=$STATE/opensearch/logs
  SEARCH_PID=$STATE/opensearch/opensearch.pid
  SEARCH_LOG=$SEARCH_LOGS/$SEARCH_NAME.log
  SEARCH_OUT=$STATE/opensearch/launcher.log
  RELAY_DIR=$STATE/stunnel
  RELAY_CONF=$RELAY_DIR/stunnel.conf
  RELAY_PID=$RELAY_DIR/stunnel.pid
  RELAY_LOG=$RELAY_DIR/stunnel.log
  TLS_DIR=$STATE/tls
  TLS_CA=$TLS_DIR/ca.pem
  TLS_CA_KEY=$TLS_DIR/ca-key.pem
  TLS_SERVER_CERT=$TLS_DIR/server.pem
  TLS_SERVER_KEY=$TLS_DIR/server-key.pem
  TLS_CLIENT_CERT=$TLS_DIR/client.pem
  TLS_CLIENT_KEY=$TLS_DIR/client-key.pem
  DATABASE_TLS_URL="postgres://$PG_USER:$PG_PASSWORD@localhost:$PG_PORT/$PG_DB?sslmode=verify-full&sslrootcert=$(url_encoded "$TLS_CA")"
  # cacertfile: the binaries trust only public CAs without it, and refuse the stack's broker.
  RABBITMQ_TLS_URL="amqps://$RABBIT_USER:$RABBIT_PASSWORD@localhost:$AMQPS_PORT/%2f?cacertfile=$(url_encoded "$TLS_CA")"
  engine_paths
}

# Percent-encodes all but the characters a URL query value may hold as they are.
url_encoded() {
  local LC_ALL=C s=$1 out='' c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case "$c" in
      [A-Za-z0-9/._~-]) out+=$c ;;
      *) out+=$(printf '%%%02X' "'$c") ;;
    esac
  done
  printf '%s' "$out"
}

ensure_packages() {
  local missing=()
  [ -n "$(pg_bin)" ] || missing+=(postgresql)
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
  [ -n "$(java_home)" ] || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  command -v unzip >/dev/null 2>&1 || missing+=(unzip)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  stunnel_bin >/dev/null || missing+=(stunnel4)
  # promtool checks the alert rules in the tests.
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  local sudo=()
  if ! is_root; then
    command -v sudo >/dev/null 2>&1 || die "missing packages ${missing[*]}; install them as root (apt-get install ${missing[*]})"
    sudo=(sudo)
  fi
  # Keep package scripts from starting the system-wide services on ports the stack uses.
  local policy=/usr/sbin/policy-rc.d added_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod +x "$policy"
    added_policy=1
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  local rc=0
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1 || rc=$?
  [ -n "$added_policy" ] && "${sudo[@]}" rm -f "$policy"
  [ $rc -eq 0 ] || die "apt-get install ${missing[*]} failed; see $STATE/apt.log"
}

ensure_service_user() {
  is_root || return 0
  id "$SERVICE_USER" >/dev/null 2>&1 && return 0
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$SERVICE_USER"
}

own_state() { is_root && chown -R "$SERVICE_USER" "$STATE"; return 0; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

redacted() { printf '%s' "$1" | sed -E 's#(://[^:/@]+):[^@/]*@#\1:***@#'; }
