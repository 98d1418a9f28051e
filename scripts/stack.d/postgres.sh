# shellcheck shell=bash
# Sourced by scripts/stack.
#
# PostgreSQL: one server of the Debian package, its data in <state>/postgres.

pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do [ -d "$dir" ] && printf '%s\n' "$dir"; done | sort -V | tail -n 1
}

pg_running() { [ -f "$PG_DATA/PG_VERSION" ] && as_service "$(pg_bin)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

pg_admin() { as_service "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres "$@"; }

# Appends the TLS settings to postgresql.conf unless there; true when it did.
# initdb's pg_hba.conf has `host all all 127.0.0.1/32 scram-sha-256`, which matches TLS and
# plaintext connections alike; check_postgres proves both.
pg_add_tls() {
  grep -q '^ssl = on' "$PG_DATA/postgresql.conf" && return 1
  cat >>"$PG_DATA/postgresql.conf" <<EOF
# TLS (scripts/stack), on the same port as plaintext
ssl = on
ssl_cert_file = '$TLS_SERVER_CERT'
ssl_key_file = '$TLS_SERVER_KEY'
EOF
}

# Appends what WAL capture needs (docs/database.md, "WAL capture") unless there; true when it
# did. wal_level is read at start only: a running server must restart to take it.
pg_add_logical() {
  grep -q '^wal_level = logical' "$PG_DATA/postgresql.conf" && return 1
  cat >>"$PG_DATA/postgresql.conf" <<EOF
# WAL capture (scripts/stack): logical decoding, a slot per capturing schema (tests make many)
wal_level = logical
max_replication_slots = 100
EOF
}

start_postgres() {
  local bin; bin=$(pg_bin)
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    say "initialising PostgreSQL in $PG_DATA"
    mkdir -p "$PG_DATA" "$PG_RUN"; own_state
    as_service "$bin/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >"$STATE/postgres-initdb.log" 2>&1 \
      || die "PostgreSQL initdb failed; see $STATE/postgres-initdb.log"
    cat >>"$PG_DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_RUN'
max_connections = 300
shared_buffers = 256MB
EOF
  fi
  local reload=$TLS_SERVER_ISSUED
  pg_add_tls && reload=1
  if pg_add_logical && pg_running; then
    say "PostgreSQL: restarting for wal_level = logical"
    as_service "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m fast -w -t 60 restart >/dev/null \
      || die "PostgreSQL did not restart; see $PG_LOG"
  fi
  mkdir -p "$PG_RUN"; own_state
  if ! pg_running; then
    port_busy "$PG_PORT" && die "PostgreSQL: port $PG_PORT is taken by another server (Debian's own cluster? stop it with 'pg_ctlcluster <version> main stop', or set BENALSAM_PG_PORT)"
    say "starting PostgreSQL on 127.0.0.1:$PG_PORT (plaintext and TLS)"
    as_service "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null \
      || die "PostgreSQL did not start; see $PG_LOG"
  elif [ -n "$reload" ]; then
    # ssl and its files are reload-time settings since PostgreSQL 10: no restart, no dropped
    # connection.
    say "PostgreSQL: reloading the configuration for TLS"
    as_service "$bin/pg_ctl" -D "$PG_DATA" reload >/dev/null || die "PostgreSQL: reload failed; see $PG_LOG"
    local deadline=$((SECONDS + 10))
    until [ "$(pg_admin -At -c 'SHOW ssl' 2>/dev/null)" = on ]; do
      [ $SECONDS -lt $deadline ] || die "PostgreSQL kept ssl off after the reload (a certificate or key it cannot read?); see $PG_LOG"
      sleep 0.2
    done
  fi
  pg_admin <<EOF || die "PostgreSQL: could not create role and database; see $PG_LOG"
SELECT 'CREATE ROLE $PG_USER LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') \gexec
ALTER ROLE $PG_USER LOGIN REPLICATION PASSWORD '$PG_PASSWORD';
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
EOF
}

# One query in plaintext, one over TLS that verifies the server certificate and host name.
check_postgres() {
  local out
  if ! out=$("$(pg_bin)/psql" -X -At "$DATABASE_URL?sslmode=disable" -c "SELECT 'ok'" 2>&1) || [ "$out" != ok ]; then
    die "PostgreSQL does not answer a query at $(redacted "$DATABASE_URL"): $out; see $PG_LOG"
  fi
  if ! out=$("$(pg_bin)/psql" -X -At "$DATABASE_TLS_URL" \
    -c "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1) || [ "$out" != t ]; then
    die "PostgreSQL does not answer over verified TLS at $(redacted "$DATABASE_TLS_URL"): $out; see $PG_LOG (is ssl on? grep ssl $PG_DATA/postgresql.conf)"
  fi
}

stop_postgres() {
  if pg_running; then
    say "stopping PostgreSQL"
    as_service "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
  fi
}

status_postgres() {
  if pg_running; then
    echo "postgres  running   $(redacted "$DATABASE_URL")"
    printf '          TLS %-5s %s\n' "$(pg_admin -At -c 'SHOW ssl' 2>/dev/null || echo '?')" "$(redacted "$DATABASE_TLS_URL")"
  else
    echo "postgres  stopped"; return 3
  fi
}

# The superuser over the server's socket (libpq key=value form): the stack's database user
# cannot create roles, so the tests of least-privilege roles create theirs with this one.
pg_admin_url() { printf 'host=%s port=%s user=postgres dbname=%s' "$PG_RUN" "$PG_PORT" "$PG_DB"; }
