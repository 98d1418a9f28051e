# shellcheck shell=bash
# Sourced by scripts/stack.
#
# Cluster mode, RabbitMQ: three nodes of one cluster (see cluster.sh).

# RabbitMQ node N: rabbit_at N <program> args...
rabbit_at() {
  local RABBIT_NODE=${R_NODE[$1]} RABBIT_BASE=${R_BASE[$1]} RABBIT_DIST_PORT=${R_DIST[$1]}
  shift
  rabbit "$@"
}

rabbit_node_ports() { # N: its ports as port:VARIABLE
  local s; s=$(port_suffix $(($1 - 1)))
  printf '%s\n' "${R_AMQP[$1]}:BENALSAM_AMQP_PORT$s" "${R_MGMT[$1]}:BENALSAM_RABBIT_MGMT_PORT$s" \
    "${R_PROM[$1]}:BENALSAM_RABBIT_PROM_PORT$s" "${R_DIST[$1]}:BENALSAM_RABBIT_DIST_PORT$s"
}

# One Erlang cookie for the three nodes (and rabbitmqctl, which reads the node's HOME).
ensure_cluster_cookie() {
  mkdir -p "$CLUSTER_DIR"
  if [ ! -s "$CLUSTER_COOKIE" ]; then
    (umask 077 && openssl rand -hex 20 | tr a-f A-F >"$CLUSTER_COOKIE")
  fi
  local i cookie
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    cookie=${R_BASE[i]}/home/.erlang.cookie
    mkdir -p "${R_BASE[i]}/home"
    if ! cmp -s "$CLUSTER_COOKIE" "$cookie"; then
      rm -f "$cookie"
      cp "$CLUSTER_COOKIE" "$cookie"
    fi
    chmod 400 "$cookie"
  done
}

# Node N's configuration, written once: its ports stay those of the first `up --cluster`.
write_rabbit_node_config() { # N
  local base=${R_BASE[$1]}
  [ -f "$base/rabbitmq.conf" ] && return 0
  mkdir -p "$base/home" "$base/log" "$base/mnesia"
  : >"$base/rabbitmq-env.conf"
  printf '[rabbitmq_management,rabbitmq_prometheus].\n' >"$base/enabled_plugins"
  cat >"$base/rabbitmq.conf" <<EOF
# Written by scripts/stack up --cluster: node ${R_NODE[$1]} of the cluster $STACK_NAME.
cluster_name = $STACK_NAME
listeners.tcp.default = 127.0.0.1:${R_AMQP[$1]}
management.tcp.ip = 127.0.0.1
management.tcp.port = ${R_MGMT[$1]}
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = ${R_PROM[$1]}
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
}

start_rabbit_node() { # N
  local i=$1 specs
  mapfile -t specs < <(rabbit_node_ports "$i")
  ports_free "RabbitMQ node ${R_NODE[i]}" "${specs[@]}"
  # epmd is shared by the nodes of all stacks on the host; the node name must be free there.
  if command -v epmd >/dev/null 2>&1 && epmd -names 2>/dev/null | grep -q "^name $STACK_NAME-$i at port"; then
    die "RabbitMQ: a node named ${R_NODE[i]} is registered with epmd but is not the process of $STATE: another stack with the same name (set BENALSAM_STACK_NAME), or this node in trouble (see ${R_LOG[i]})"
  fi
  say "starting RabbitMQ node ${R_NODE[i]} on 127.0.0.1:${R_AMQP[i]} (management :${R_MGMT[i]}, prometheus :${R_PROM[i]}, distribution :${R_DIST[i]}); log ${R_LOG[i]}"
  rm -f "${R_BASE[i]}/rabbitmq.pid"
  RABBIT_LOG_OFFSET[i]=$(stat -c %s "${R_LOG[i]}" 2>/dev/null || echo 0)
  rabbit_at "$i" rabbitmq-server -detached >"${R_BASE[i]}/launcher.log" 2>&1 \
    || die "RabbitMQ node ${R_NODE[i]} did not start; see ${R_BASE[i]}/launcher.log and ${R_LOG[i]}"
}

# await_startup fails at once while the node is not yet reachable: ask again until it is. A
# node that was not the last of its cluster to stop waits here for the others (up to 5 min).
await_rabbit_node() { # N seconds
  local i=$1 deadline=$((SECONDS + $2))
  until rabbit_at "$i" rabbitmqctl -q await_startup --timeout 30 >/dev/null 2>&1; do
    if [ -s "${R_BASE[i]}/rabbitmq.pid" ] && ! rabbit_node_pid "$i" >/dev/null; then
      die "RabbitMQ node ${R_NODE[i]} exited while starting; see ${R_LOG[i]} and ${R_BASE[i]}/launcher.log"
    fi
    [ $SECONDS -lt "$deadline" ] || die "RabbitMQ node ${R_NODE[i]} did not finish booting in $2 s; see ${R_LOG[i]}"
    sleep 1
  done
}

# The nodes of the cluster as node N sees them, one a line: KEY running_nodes or disk_nodes.
rabbit_cluster_nodes() { # N key
  local json list
  json=$(rabbit_at "$1" rabbitmqctl -q cluster_status --formatter json 2>/dev/null) || return 1
  list=$(grep -oE "\"$2\":\[[^]]*\]" <<<"$json") || return 1
  grep -oE '"[^"]+"' <<<"${list#*:}" | tr -d '"' || true
}

# Waits until node N counts the nodes named among the running nodes of its cluster.
await_rabbit_members() { # N seconds node...
  local i=$1 seconds=$2 running missing node deadline=$((SECONDS + $2))
  shift 2
  while :; do
    running=$(rabbit_cluster_nodes "$i" running_nodes || true) missing=()
    for node in "$@"; do grep -qxF "$node" <<<"$running" || missing+=("$node"); done
    [ ${#missing[@]} -gt 0 ] || return 0
    [ $SECONDS -lt "$deadline" ] \
      || die "RabbitMQ: after $seconds s ${R_NODE[i]} sees $(printf '%s' "$running" | paste -sd' ' - | sed 's/^$/no running node/') running, not ${missing[*]}; see the logs $CLUSTER_DIR/rabbitmq-*/log/*.log"
    sleep 1
  done
}

# Waits until the quorum queues have all their replicas again (node N's come back after its
# start): as long as one lacks one, the nodes of its other replicas are quorum critical, which
# rabbitmq-diagnostics check_if_node_is_quorum_critical tells from the live Raft states of the
# replicas (the management API's "online" lags, it comes from the statistics). Asked on each
# node V named, which covers the queues of every vhost with a replica there.
await_rabbit_replicas() { # N seconds V...
  local i=$1 seconds=$2 v out=${R_BASE[$1]}/replicas-check.log deadline=$((SECONDS + $2))
  shift 2
  for v in "$@"; do
    until rabbit_at "$v" rabbitmq-diagnostics -q check_if_node_is_quorum_critical >"$out" 2>&1 </dev/null; do
      [ $SECONDS -lt "$deadline" ] \
        || die "RabbitMQ node ${R_NODE[i]}: after $seconds s, quorum queues still lack replicas ($(head -c 300 "$out" | paste -sd' ' -)); see $out and ${R_LOG[i]}"
      sleep 1
    done
  done
}

# Nodes 2 and 3 join node 1 unless they are members already.
join_rabbit_nodes() {
  local members i log
  members=$(rabbit_cluster_nodes 1 disk_nodes) \
    || die "RabbitMQ node ${R_NODE[1]} does not tell its cluster status; see ${R_LOG[1]}"
  for ((i = 2; i <= CLUSTER_SIZE; i++)); do
    grep -qxF "${R_NODE[i]}" <<<"$members" && continue
    log=${R_BASE[i]}/join.log
    say "RabbitMQ: joining ${R_NODE[i]} to the cluster of ${R_NODE[1]} (stop_app, join_cluster, start_app)"
    { rabbit_at "$i" rabbitmqctl stop_app && rabbit_at "$i" rabbitmqctl join_cluster "${R_NODE[1]}" \
      && rabbit_at "$i" rabbitmqctl start_app; } >"$log" 2>&1 </dev/null \
      || die "RabbitMQ: ${R_NODE[i]} could not join the cluster of ${R_NODE[1]}; see $log and ${R_LOG[i]}"
  done
}

# Whether node N may boot without waiting for a peer: new, or the last of its cluster to stop
# (its nodes_running_at_shutdown names itself alone). The others wait for a peer's tables.
rabbit_stopped_last() { # N
  local file=${R_BASE[$1]}/mnesia/${R_NODE[$1]}/nodes_running_at_shutdown
  [ -f "$file" ] || return 0
  [ "$(tr -d ' \n' <"$file")" = "['${R_NODE[$1]}']." ]
}

# RabbitMQ 3.10 nodes of a cluster booting side by side can crash syncing feature flags with a
# peer that has not loaded its registry yet ({incompatible_feature_flags,{badrpc,...badmap
# undefined...}} in the log): the next node starts only once this one wrote its feature flag
# states, a few seconds into its boot.
await_rabbit_prelaunch() { # N
  local i=$1 start=$SECONDS deadline=$((SECONDS + 120))
  until tail -c +"$((${RABBIT_LOG_OFFSET[i]:-0} + 1))" "${R_LOG[i]}" 2>/dev/null \
    | grep -qE 'feature flag states written to disk|Server startup complete'; do
    # The Erlang VM of the node, known by its HOME on the command line, a moment after launch.
    if [ $((SECONDS - start)) -ge 5 ] && ! rabbit_node_pid "$i" >/dev/null \
      && ! grep -qzxF -- "${R_BASE[i]}/home" /proc/[0-9]*/cmdline 2>/dev/null; then
      die "RabbitMQ node ${R_NODE[i]} exited while starting; see ${R_LOG[i]} and ${R_BASE[i]}/launcher.log"
    fi
    [ $SECONDS -lt "$deadline" ] || die "RabbitMQ node ${R_NODE[i]} did not get through its first boot steps in 120 s; see ${R_LOG[i]}"
    sleep 0.5
  done
}

# Starts the nodes that do not run: new ones together, members of the cluster one after the
# other (await_rabbit_prelaunch), one that may boot alone first. start_rabbit_cluster_wait
# waits until they finished booting.
start_rabbit_cluster() {
  local i order=()
  ensure_cluster_cookie
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do write_rabbit_node_config "$i"; done
  own_state
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do rabbit_stopped_last "$i" && order+=("$i"); done
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do rabbit_stopped_last "$i" || order+=("$i"); done
  local member
  for i in "${order[@]}"; do
    rabbit_node_pid "$i" >/dev/null && continue
    # A new node is alone in a cluster of its own until it joins: nothing to sync with.
    member=; [ ! -d "${R_BASE[i]}/mnesia/${R_NODE[i]}" ] || member=1
    start_rabbit_node "$i"
    [ -z "$member" ] || await_rabbit_prelaunch "$i"
  done
}

start_rabbit_cluster_wait() {
  local i
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do await_rabbit_node "$i" 300; done
  join_rabbit_nodes
  await_rabbit_members 1 120 "${R_NODE[@]}"
  ensure_rabbit_admin
}

# Per node: the AMQP handshake and the management API; then the feature flags, and a quorum
# queue declared through node 1 with a member on each node.
check_rabbit_cluster() {
  local i frame deadline out members q=benalsam-stack.quorum-check auth="$RABBIT_USER:$RABBIT_PASSWORD"
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    frame=$(
      exec 3<>"/dev/tcp/127.0.0.1/${R_AMQP[i]}" || exit 1
      printf 'AMQP\x00\x00\x09\x01' >&3
      timeout 5 head -c 3 <&3 | od -An -tx1 | tr -d ' \n'
    ) || true
    [ "$frame" = 010000 ] || die "RabbitMQ node ${R_NODE[i]} does not answer AMQP on 127.0.0.1:${R_AMQP[i]}; see ${R_LOG[i]}"
    deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null -u "$auth" "${R_MGMT_URL[i]}/api/whoami" 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || die "RabbitMQ node ${R_NODE[i]}: the management API refuses $RABBIT_USER on :${R_MGMT[i]}; see ${R_LOG[i]}"
      sleep 1
    done
  done
  if curl -fsS -m 10 -u "$auth" "${R_MGMT_URL[1]}/api/feature-flags" 2>/dev/null | grep -q '"state":"disabled"'; then
    say "RabbitMQ: enabling the feature flags left off"
    rabbit rabbitmqctl -q enable_feature_flag all >/dev/null || die "RabbitMQ: could not enable the feature flags; see ${R_LOG[1]}"
  fi
  curl -fsS -m 30 -o /dev/null -u "$auth" -X PUT -H 'content-type: application/json' \
    -d '{"durable":true,"auto_delete":false,"arguments":{"x-queue-type":"quorum"}}' \
    "${R_MGMT_URL[1]}/api/queues/%2F/$q" 2>/dev/null \
    || die "RabbitMQ: could not declare the quorum queue $q through ${R_NODE[1]}; see ${R_LOG[1]}"
  out=$(curl -fsS -m 10 -u "$auth" "${R_MGMT_URL[1]}/api/queues/%2F/$q" 2>/dev/null) || out=''
  curl -fsS -m 30 -o /dev/null -u "$auth" -X DELETE "${R_MGMT_URL[1]}/api/queues/%2F/$q" 2>/dev/null || true
  members=$(grep -oE '"members":\[[^]]*\]' <<<"$out" | grep -oE '"[^"]+@[^"]+"' | tr -d '"' | paste -sd' ' -) || true
  [ "$(wc -w <<<"$members")" -eq "$CLUSTER_SIZE" ] \
    || die "RabbitMQ: the quorum queue $q has the members '${members}', not all $CLUSTER_SIZE nodes; see ${R_LOG[1]}"
}

stop_rabbit_node() { # N
  local pid
  pid=$(rabbit_node_pid "$1") || return 0
  say "stopping RabbitMQ node ${R_NODE[$1]} (pid $pid)"
  rabbit_at "$1" rabbitmqctl -q shutdown >/dev/null 2>&1 </dev/null || kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  say "RabbitMQ node ${R_NODE[$1]} still runs after 30 s; killing it (see ${R_LOG[$1]})"
  kill -9 "$pid" 2>/dev/null || true
}
