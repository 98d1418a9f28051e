# shellcheck shell=bash
# Sourced by scripts/stack.
#
# RabbitMQ: one node of the Debian package (<state>/rabbitmq), its users and permissions.
#
# RabbitMQ users: the administrator benalsam (password benalsam123), and one user per
# component, password benalsam123, with the permissions on vhost / given by
# docker/rabbitmq/permissions.tsv (user<TAB>configure<TAB>write<TAB>read, regular expressions;
# ^$ for none). `up` adds a missing user and sets the permissions of every listed user; it
# removes no user, and touches no other vhost. Those lines fit the default topology (the
# listings); an event-type file with more tables needs its own lines, which `permissions`
# applies (above); a later `up` sets the default ones again.

rabbit() { # rabbit <program> args... : a RabbitMQ script against the stack's node
  local program=$1; shift
  as_service env \
    HOME="$RABBIT_BASE/home" \
    RABBITMQ_NODENAME="$RABBIT_NODE" \
    RABBITMQ_CONF_ENV_FILE="$RABBIT_BASE/rabbitmq-env.conf" \
    RABBITMQ_CONFIG_FILE="$RABBIT_BASE/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$RABBIT_BASE/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RABBIT_BASE/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$RABBIT_BASE/mnesia" \
    RABBITMQ_LOG_BASE="$RABBIT_BASE/log" \
    RABBITMQ_PID_FILE="$RABBIT_BASE/rabbitmq.pid" \
    RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "/usr/lib/rabbitmq/bin/$program" "$@"
}

rabbit_running() { [ -d "$RABBIT_BASE/home" ] && rabbit rabbitmq-diagnostics -q ping >/dev/null 2>&1; }

# Appends the TLS listener to rabbitmq.conf unless there; true when it did.
rabbit_add_tls() {
  grep -q '^listeners.ssl.default' "$RABBIT_BASE/rabbitmq.conf" && return 1
  cat >>"$RABBIT_BASE/rabbitmq.conf" <<EOF
listeners.ssl.default = 127.0.0.1:$AMQPS_PORT
ssl_options.cacertfile = $TLS_CA
ssl_options.certfile = $TLS_SERVER_CERT
ssl_options.keyfile = $TLS_SERVER_KEY
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
EOF
}

start_rabbitmq() {
  RABBIT_STARTED='' RABBIT_TLS_PENDING=''
  if [ ! -f "$RABBIT_BASE/rabbitmq.conf" ]; then
    mkdir -p "$RABBIT_BASE/home" "$RABBIT_BASE/log" "$RABBIT_BASE/mnesia"
    : >"$RABBIT_BASE/rabbitmq-env.conf"
    printf '[rabbitmq_management,rabbitmq_prometheus].\n' >"$RABBIT_BASE/enabled_plugins"
    cat >"$RABBIT_BASE/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RABBIT_MGMT_PORT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $RABBIT_PROM_PORT
default_user = $RABBIT_USER
default_pass = $RABBIT_PASSWORD
default_user_tags.administrator = true
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
loopback_users = none
disk_free_limit.absolute = 100MB
# A backstop for every publisher: the binaries refuse larger messages themselves (1 MiB by
# default, BENALSAM_MAX_MESSAGE_BYTES); the tests publish up to 10 MiB to check that.
max_message_size = 16777216
log.file.level = info
EOF
  fi
  rabbit_add_tls || true
  own_state
  if ! rabbit_running; then
    port_busy "$AMQP_PORT" && die "RabbitMQ: port $AMQP_PORT is taken by another server (Debian's rabbitmq-server service? stop it, or set BENALSAM_AMQP_PORT)"
    ports_free RabbitMQ "$AMQPS_PORT:BENALSAM_AMQPS_PORT" "$RABBIT_MGMT_PORT:BENALSAM_RABBIT_MGMT_PORT" \
      "$RABBIT_PROM_PORT:BENALSAM_RABBIT_PROM_PORT" "$RABBIT_DIST_PORT:BENALSAM_RABBIT_DIST_PORT"
    # epmd is shared by the nodes of all stacks on the host; the node name must be free there.
    if command -v epmd >/dev/null 2>&1 && epmd -names 2>/dev/null | grep -q "^name $STACK_NAME at port"; then
      die "RabbitMQ: a node named $RABBIT_NODE is registered with epmd but does not answer this stack's ping: another stack with the same name (set BENALSAM_STACK_NAME), or this stack's node in trouble (see $RABBIT_LOG)"
    fi
    say "starting RabbitMQ $RABBIT_NODE on 127.0.0.1:$AMQP_PORT, TLS on :$AMQPS_PORT (management on :$RABBIT_MGMT_PORT)"
    rabbit rabbitmq-server -detached >"$RABBIT_BASE/launcher.log" 2>&1 \
      || die "RabbitMQ did not start; see $RABBIT_BASE/launcher.log and $RABBIT_LOG"
    RABBIT_STARTED=1
  fi
  # await_startup fails at once while the node is not yet reachable: ask again until it is.
  local deadline=$((SECONDS + 120))
  until rabbit rabbitmqctl -q await_startup --timeout 30 >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "RabbitMQ did not finish booting in 120 s; see $RABBIT_LOG and $RABBIT_BASE/launcher.log"
    sleep 1
  done
  ensure_rabbit_admin
}

# default_user applies to a new node only; make sure the user is there on an old one.
ensure_rabbit_admin() {
  if ! rabbit rabbitmqctl -q list_users --no-table-headers 2>/dev/null | cut -f1 | grep -qxF "$RABBIT_USER"; then
    rabbit rabbitmqctl -q add_user "$RABBIT_USER" "$RABBIT_PASSWORD" >/dev/null
    rabbit rabbitmqctl -q set_user_tags "$RABBIT_USER" administrator >/dev/null
    rabbit rabbitmqctl -q set_permissions -p / "$RABBIT_USER" '.*' '.*' '.*' >/dev/null
  fi
}

# One user per component, with the permissions on vhost / of docker/rabbitmq/permissions.tsv.
# Asks the node for its users and permissions once, and changes only what differs.
# (rabbitmqctl reads stdin: inside the loop it gets /dev/null, not the rest of the file.)
ensure_rabbit_users() { # [file]
  local file=${1:-$RABBIT_PERMISSIONS}
  [ -f "$file" ] || die "RabbitMQ: the permissions file $file is missing (one line per component user: user<TAB>configure<TAB>write<TAB>read)"
  local users perms line n=0 user configure write read rest
  users=$(rabbit rabbitmqctl -q list_users --no-table-headers | cut -f1) \
    || die "RabbitMQ: could not list users; see $RABBIT_LOG"
  perms=$(rabbit rabbitmqctl -q list_permissions -p / --no-table-headers) \
    || die "RabbitMQ: could not list the permissions of vhost /; see $RABBIT_LOG"
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    IFS=$'\t' read -r user configure write read rest <<<"$line"
    if [ -z "$read" ] || [ -n "$rest" ]; then
      die "RabbitMQ: $file line $n: expected user<TAB>configure<TAB>write<TAB>read (^\$ grants nothing)"
    fi
    [ "$user" != "$RABBIT_USER" ] || die "RabbitMQ: $file line $n: $RABBIT_USER is the administrator, not a component user"
    if ! grep -qxF "$user" <<<"$users"; then
      say "RabbitMQ: adding the user $user"
      rabbit rabbitmqctl -q add_user "$user" "$RABBIT_COMPONENT_PASSWORD" </dev/null >/dev/null \
        || die "RabbitMQ: could not add the user $user; see $RABBIT_LOG"
    fi
    if ! grep -qxF "$user"$'\t'"$configure"$'\t'"$write"$'\t'"$read" <<<"$perms"; then
      say "RabbitMQ: setting the permissions of $user on vhost / from $file"
      rabbit rabbitmqctl -q set_permissions -p / "$user" "$configure" "$write" "$read" </dev/null >/dev/null \
        || die "RabbitMQ: could not set the permissions of $user (is every field of line $n a valid regular expression?); see $RABBIT_LOG"
    fi
  done <"$file"
}

# A real AMQP handshake: the broker must answer the protocol header with Connection.Start,
# a method frame (type 1) on channel 0; and the management API must accept the credentials.
check_rabbitmq() {
  local frame
  frame=$(
    exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT" || exit 1
    printf 'AMQP\x00\x00\x09\x01' >&3
    timeout 5 head -c 3 <&3 | od -An -tx1 | tr -d ' \n'
  ) || true
  [ "$frame" = 010000 ] || die "RabbitMQ does not answer AMQP on 127.0.0.1:$AMQP_PORT; see $RABBIT_LOG"
  check_rabbitmq_tls
  local deadline=$((SECONDS + 60))
  until curl -fsS -o /dev/null -u "$RABBIT_USER:$RABBIT_PASSWORD" "http://127.0.0.1:$RABBIT_MGMT_PORT/api/whoami"; do
    [ $SECONDS -lt $deadline ] || die "RabbitMQ management API refuses $RABBIT_USER on :$RABBIT_MGMT_PORT; see $RABBIT_LOG"
    sleep 1
  done
}

# The same handshake over TLS, verifying the certificate against the CA and the name localhost.
check_rabbitmq_tls() {
  if ! port_busy "$AMQPS_PORT"; then
    [ -n "$RABBIT_STARTED" ] && die "RabbitMQ started without its TLS listener on 127.0.0.1:$AMQPS_PORT; see $RABBIT_LOG"
    RABBIT_TLS_PENDING=1
    say "RabbitMQ: the node predates its TLS listener (127.0.0.1:$AMQPS_PORT, in $RABBIT_BASE/rabbitmq.conf); it opens at the node's next start. Restart it when nobody needs it: scripts/stack rabbitmqctl shutdown; scripts/stack up"
    return 0
  fi
  local frame
  frame=$({ printf 'AMQP\x00\x00\x09\x01'; sleep 1; } \
    | timeout 10 openssl s_client -connect "127.0.0.1:$AMQPS_PORT" -servername localhost \
        -verify_hostname localhost -CAfile "$TLS_CA" -verify_return_error -brief 2>"$RABBIT_BASE/tls-check.log" \
    | head -c 3 | od -An -tx1 | tr -d ' \n') || true
  [ "$frame" = 010000 ] \
    || die "RabbitMQ does not answer AMQP over verified TLS on 127.0.0.1:$AMQPS_PORT; see $RABBIT_BASE/tls-check.log and $RABBIT_LOG"
}

stop_rabbitmq() {
  if rabbit_running; then
    say "stopping RabbitMQ"
    rabbit rabbitmqctl -q shutdown >/dev/null 2>&1 || true
  fi
}

# The component users' permissions from a file of user<TAB>configure<TAB>write<TAB>read lines,
# such as `benalsam-bridge --config FILE topology --permissions` prints for an event-type file
# (- reads them from stdin).
cmd_permissions() { # [FILE|-]
  [ $# -le 1 ] || die "permissions: one file at most (scripts/stack permissions [FILE|-])"
  local file=${1:-$RABBIT_PERMISSIONS}
  # stdin first: the RabbitMQ scripts below read it too.
  if [ "$file" = - ]; then
    PERMISSIONS_STDIN=$(mktemp)
    trap 'rm -f "$PERMISSIONS_STDIN"' EXIT
    cat >"$PERMISSIONS_STDIN"
    file=$PERMISSIONS_STDIN
  fi
  [ -s "$file" ] || die "permissions: ${1:-$file} is empty or missing (expected the lines of benalsam-bridge --config FILE topology --permissions)"
  resolve_state_dir
  if cluster_mode; then use_cluster; fi
  rabbit_running </dev/null || die "RabbitMQ of $STATE is not running: scripts/stack up first"
  ensure_rabbit_users "$file" </dev/null
  [ "$file" != "${PERMISSIONS_STDIN:-}" ] || file=stdin
  say "RabbitMQ: the component users on vhost / have the permissions of $file"
}
