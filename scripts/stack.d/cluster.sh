# shellcheck shell=bash
# Sourced by scripts/stack.
#
# Cluster mode: `up --cluster` (or BENALSAM_STACK_CLUSTER=1) starts, beside one PostgreSQL, a
# RabbitMQ cluster of the nodes <name>-1@localhost, <name>-2@localhost, <name>-3@localhost and an
# OpenSearch cluster <name>-search of the nodes <name>-search-1, -2, -3. Node N (1-3) listens on
# the base port of each variable plus N-1 (defaults in brackets):
#   RabbitMQ node N  AMQP BENALSAM_AMQP_PORT+N-1 [5672-5674]
#                    management BENALSAM_RABBIT_MGMT_PORT+N-1 [15672-15674]
#                    Prometheus BENALSAM_RABBIT_PROM_PORT+N-1 [15692-15694]
#                    Erlang distribution BENALSAM_RABBIT_DIST_PORT+N-1 [25672-25674]
#   search node N    HTTP BENALSAM_SEARCH_PORT+N-1 [9200-9202]
#                    transport BENALSAM_SEARCH_TRANSPORT_PORT+N-1 [9300-9302]
#                    heap BENALSAM_SEARCH_HEAP each [512m]
# No TLS for RabbitMQ and OpenSearch in cluster mode (PostgreSQL keeps it, DATABASE_TLS_URL):
# BENALSAM_AMQPS_PORT, BENALSAM_SEARCH_TLS_PORT and BENALSAM_SEARCH_MTLS_PORT are unused, no
# stunnel runs, and `env` unsets RABBITMQ_TLS_URL, ELASTICSEARCH_TLS_URL, ELASTICSEARCH_MTLS_URL.
# `env` prints RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL and ELASTICSEARCH_URL of node 1, the URLs
# of all three nodes comma-separated (RABBITMQ_URLS, RABBITMQ_MANAGEMENT_URLS,
# ELASTICSEARCH_URLS), BENALSAM_QUEUE_TYPE=quorum, the node names (BENALSAM_RABBIT_NODES,
# BENALSAM_SEARCH_NODES) and BENALSAM_STACK_DIR, so that a test finds the instance for
#   kill -9 "$(scripts/stack pid rabbit 2)"; scripts/stack restart-node rabbit 2
# restart-node returns once the node runs and is back in its cluster: a RabbitMQ node among the
# running nodes as every running node sees them and, when all three run, every quorum queue (of
# every vhost) with all its replicas again (no node is quorum critical; leaders that moved away
# stay where they are: nothing rebalances them); an OpenSearch node counted in number_of_nodes
# again (3, or as many as run), health yellow or green, and, with all three running, green
# within 60 s where the indices allow it (else it says so).
# Everything of the cluster lives in <state>/cluster: rabbitmq-N/ (configuration, mnesia,
# log/<node>.log, rabbitmq.pid, home/.erlang.cookie: one cookie for the three nodes, mode 400)
# and search-N/ (config/, the distribution's copied with a keystore of its own; data,
# logs/<name>-search.log and gc.log, opensearch.pid; the distribution itself is shared).
# Nodes 2 and 3 join node 1 (stop_app, join_cluster, start_app) when not yet members; one epmd
# serves all nodes. Nodes that are members already start one after the other, the last to stop
# first (`down` stops node 1 last): RabbitMQ 3.10 nodes that boot side by side can crash
# syncing feature flags. The OpenSearch nodes get
# cluster.initial_cluster_manager_nodes only while the cluster has never formed: once it has,
# `up` writes <state>/cluster/search-formed, and later starts find the cluster through
# discovery.seed_hosts and their own data, with no new bootstrap (an explicit list of
# bootstrap nodes must not meet a formed cluster). <state>/cluster/active marks the folder's
# layout as the cluster. The first `up --cluster` records the name and ports in
# <state>/cluster/settings; later commands on that folder use the recorded values (`up
# --cluster` refuses other ones, the other commands warn), so `pid` and `restart-node` need no
# more than BENALSAM_STACK_DIR.
# Commands follow the layout of the folder's last `up` unless told (--cluster, or
# BENALSAM_STACK_CLUSTER=1 or 0). The layouts share the ports: `up --cluster` refuses while the
# folder's single nodes run, and `up` while its cluster runs; `down` stops either.

CLUSTER_SIZE=3
# What the first `up --cluster` records in <state>/cluster/settings, as VARIABLE:name.
CLUSTER_RECORDED=(BENALSAM_STACK_NAME:STACK_NAME BENALSAM_PG_PORT:PG_PORT
  BENALSAM_AMQP_PORT:AMQP_PORT BENALSAM_RABBIT_MGMT_PORT:RABBIT_MGMT_PORT
  BENALSAM_RABBIT_PROM_PORT:RABBIT_PROM_PORT BENALSAM_RABBIT_DIST_PORT:RABBIT_DIST_PORT
  BENALSAM_SEARCH_PORT:SEARCH_PORT BENALSAM_SEARCH_TRANSPORT_PORT:SEARCH_TRANSPORT_PORT)
SEARCH_LAUNCHERS=() SEARCH_STARTED=() RABBIT_LOG_OFFSET=()

# The files of the cluster: they depend on the state folder alone (down and up find the
# processes by them, whatever the variables say). Arrays indexed by node, 1 to 3.
cluster_paths() {
  CLUSTER_DIR=${STATE%/}/cluster
  CLUSTER_MARK=$CLUSTER_DIR/active
  CLUSTER_SETTINGS=$CLUSTER_DIR/settings
  CLUSTER_COOKIE=$CLUSTER_DIR/erlang.cookie
  SEARCH_FORMED=$CLUSTER_DIR/search-formed
  R_BASE=() S_DIR=() S_DATA=() S_LOGS=() S_PID=() S_OUT=()
  local i
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    R_BASE[i]=$CLUSTER_DIR/rabbitmq-$i
    S_DIR[i]=$CLUSTER_DIR/search-$i
    S_DATA[i]=${S_DIR[i]}/data
    S_LOGS[i]=${S_DIR[i]}/logs
    S_PID[i]=${S_DIR[i]}/opensearch.pid
    S_OUT[i]=${S_DIR[i]}/launcher.log
  done
}

# Takes the name and base ports the folder's first `up --cluster` recorded. A variable set to
# another value: `up` refuses (strict), the other commands say so and use the recorded one.
load_cluster_settings() { # [strict]
  [ -f "$CLUSTER_SETTINGS" ] || return 0
  local strict=${1:-} line var value spec name
  while IFS= read -r line || [ -n "$line" ]; do
    [[ $line =~ ^(BENALSAM_[A-Z_]+)=([A-Za-z0-9_-]+)$ ]] || continue
    var=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]} name=
    for spec in "${CLUSTER_RECORDED[@]}"; do [ "${spec%%:*}" = "$var" ] && name=${spec#*:}; done
    [ -n "$name" ] || continue
    if [ -n "${!var+set}" ] && [ "${!var}" != "$value" ]; then
      [ -z "$strict" ] || die "the cluster in $STATE was made with $var=$value, not ${!var}: unset $var, or use another BENALSAM_STACK_DIR for other values"
      say "warning: the cluster in $STATE was made with $var=$value; ignoring $var=${!var}"
    fi
    printf -v "$name" '%s' "$value"
  done <"$CLUSTER_SETTINGS"
}

save_cluster_settings() {
  [ -f "$CLUSTER_SETTINGS" ] && return 0
  mkdir -p "$CLUSTER_DIR"
  local spec name
  {
    echo "# Written by the first 'scripts/stack up --cluster' on this folder; later commands use these values."
    for spec in "${CLUSTER_RECORDED[@]}"; do
      name=${spec#*:}
      printf '%s=%s\n' "${spec%%:*}" "${!name}"
    done
  } >"$CLUSTER_SETTINGS"
}

port_suffix() { [ "$1" -gt 0 ] && printf '+%s' "$1"; return 0; } # offset

# Every port of the cluster instance, as port:VARIABLE, node N taking VARIABLE+N-1.
cluster_port_settings() {
  printf '%s\n' "$PG_PORT:BENALSAM_PG_PORT"
  local spec base k
  for spec in "$AMQP_PORT:BENALSAM_AMQP_PORT" "$RABBIT_MGMT_PORT:BENALSAM_RABBIT_MGMT_PORT" \
    "$RABBIT_PROM_PORT:BENALSAM_RABBIT_PROM_PORT" "$RABBIT_DIST_PORT:BENALSAM_RABBIT_DIST_PORT" \
    "$SEARCH_PORT:BENALSAM_SEARCH_PORT" "$SEARCH_TRANSPORT_PORT:BENALSAM_SEARCH_TRANSPORT_PORT"; do
    base=${spec%%:*}
    if ! [[ $base =~ ^[0-9]{1,5}$ ]]; then printf '%s\n' "$spec"; continue; fi
    for ((k = 0; k < CLUSTER_SIZE; k++)); do
      printf '%s:%s%s\n' "$((10#$base + k))" "${spec#*:}" "$(port_suffix "$k")"
    done
  done
}

# Names, ports and URLs of the nodes, from the name and base ports (check_settings first).
# Node 1 stands for the stack where one node is meant: RABBITMQ_URL, ELASTICSEARCH_URL, the
# `rabbitmqctl` command, the users.
cluster_layout() {
  R_NODE=() R_LOG=() R_AMQP=() R_MGMT=() R_PROM=() R_DIST=() R_URL=() R_MGMT_URL=()
  S_NAME=() S_HTTP=() S_TRANSPORT=() S_LOG=() S_URL=()
  SEARCH_CLUSTER=$STACK_NAME-search
  local i k
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    k=$((i - 1))
    R_NODE[i]=$STACK_NAME-$i@localhost
    R_LOG[i]=${R_BASE[i]}/log/${R_NODE[i]}.log
    R_AMQP[i]=$((10#$AMQP_PORT + k))
    R_MGMT[i]=$((10#$RABBIT_MGMT_PORT + k))
    R_PROM[i]=$((10#$RABBIT_PROM_PORT + k))
    R_DIST[i]=$((10#$RABBIT_DIST_PORT + k))
    R_URL[i]="amqp://$RABBIT_USER:$RABBIT_PASSWORD@127.0.0.1:${R_AMQP[i]}/%2f"
    R_MGMT_URL[i]="http://127.0.0.1:${R_MGMT[i]}"
    S_NAME[i]=$SEARCH_CLUSTER-$i
    S_HTTP[i]=$((10#$SEARCH_PORT + k))
    S_TRANSPORT[i]=$((10#$SEARCH_TRANSPORT_PORT + k))
    S_LOG[i]=${S_LOGS[i]}/$SEARCH_CLUSTER.log
    S_URL[i]="http://127.0.0.1:${S_HTTP[i]}"
  done
  RABBIT_NODE=${R_NODE[1]} RABBIT_BASE=${R_BASE[1]} RABBIT_LOG=${R_LOG[1]} RABBIT_DIST_PORT=${R_DIST[1]}
  RABBITMQ_URL=${R_URL[1]} ELASTICSEARCH_URL=${S_URL[1]}
  DATABASE_URL="postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
  DATABASE_TLS_URL="postgres://$PG_USER:$PG_PASSWORD@localhost:$PG_PORT/$PG_DB?sslmode=verify-full&sslrootcert=$(url_encoded "$TLS_CA")"
}

# The cluster of the folder, for every command but `up`: paths, recorded settings, layout.
use_cluster() {
  cluster_paths
  load_cluster_settings
  check_settings cluster_port_settings
  cluster_layout
}

# Whether a command other than `up` works on the cluster: as told (--cluster,
# BENALSAM_STACK_CLUSTER), else as the folder's last `up` left it.
cluster_mode() {
  case "$CLUSTER_FLAG" in 1) return 0 ;; 0) return 1 ;; esac
  [ -e "$STATE/cluster/active" ]
}

joined() { local -n list=$1; local IFS=,; printf '%s' "${list[*]}"; } # array name

node_number() { # kind N: dies unless N is 1, 2 or 3
  if ! [[ ${2:-} =~ ^[1-9]$ ]] || [ "$2" -gt "$CLUSTER_SIZE" ]; then
    die "$1 node '${2:-}': say 1, 2 or 3"
  fi
}

# The OS pid of RabbitMQ node N while it runs (a node killed with -9 leaves its pid file
# behind): the pid file's process, when its command line names the node's HOME.
rabbit_node_pid() { # N
  local file=${R_BASE[$1]}/rabbitmq.pid pid
  [ -s "$file" ] || return 1
  pid=$(tr -d ' \n' <"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "-home ${R_BASE[$1]}/home " || return 1
  printf '%s\n' "$pid"
}

# The same for OpenSearch node N: the pid file's java, started with the node's data folder.
search_node_pid() { # N
  local file=${S_PID[$1]} pid
  [ -s "$file" ] || return 1
  pid=$(tr -d ' \n' <"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "-Epath.data=${S_DATA[$1]} " || return 1
  printf '%s\n' "$pid"
}

cluster_running() {
  local i
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    rabbit_node_pid "$i" >/dev/null && return 0
    search_node_pid "$i" >/dev/null && return 0
  done
  return 1
}

# Whether the single-node RabbitMQ, OpenSearch or relay of the folder runs (they take the
# ports of node 1).
single_running() {
  search_running || relay_running && return 0
  local pid
  [ -s "$RABBIT_BASE/rabbitmq.pid" ] && pid=$(tr -d ' \n' <"$RABBIT_BASE/rabbitmq.pid") \
    && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && rabbit_running
}

# `down`: the cluster's nodes, OpenSearch first; RabbitMQ nodes 2 and 3 together (a node
# takes some 5-10 s to stop), then node 1, so that node 1, the last to stop, may start alone
# (`up` starts all three together anyway).
stop_cluster() {
  [ -d "$STATE/cluster" ] || return 0
  cluster_paths
  cluster_running || return 0
  load_cluster_settings
  check_settings cluster_port_settings
  cluster_layout
  stop_search_nodes
  local i pids=()
  for ((i = 2; i <= CLUSTER_SIZE; i++)); do
    stop_rabbit_node "$i" &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  stop_rabbit_node 1
}

# The single-node layout takes the ports of a cluster's node 1: not while the folder's cluster
# runs. A folder whose cluster is stopped goes back to the single-node layout.
refuse_running_cluster() {
  [ -e "$STATE/cluster/active" ] || return 0
  cluster_paths
  if cluster_running; then
    die "the cluster of $STATE runs (scripts/stack up --cluster): use 'scripts/stack up --cluster', or stop it with 'scripts/stack down' first"
  fi
  rm -f "$CLUSTER_MARK"
}

cmd_up_cluster() {
  ensure_service_user
  resolve_state_dir
  lock_state
  cluster_paths
  if single_running; then
    die "the single-node stack of $STATE runs on the ports of node 1: stop it first (scripts/stack down), or give the cluster another BENALSAM_STACK_DIR"
  fi
  [ "$SEARCH_ENGINE" = opensearch ] || die "cluster mode runs OpenSearch only; --engine $SEARCH_ENGINE_KEY is for the single-node layout"
  load_cluster_settings strict
  check_settings cluster_port_settings
  cluster_layout
  ensure_packages
  save_cluster_settings
  : >"$CLUSTER_MARK"
  ensure_tls
  start_postgres
  # RabbitMQ and OpenSearch boot side by side (the OpenSearch launchers in the background);
  # then each is waited for.
  start_search_cluster
  start_rabbit_cluster
  start_rabbit_cluster_wait
  ensure_rabbit_users
  start_search_cluster_wait
  check_postgres
  check_rabbit_cluster
  check_search_cluster
  say "all answer: PostgreSQL (plaintext and TLS), RabbitMQ ${R_NODE[*]} (one cluster, quorum queues on all three), OpenSearch ${S_NAME[*]} (one cluster); no TLS for RabbitMQ and OpenSearch in cluster mode"
  print_cluster_urls
}

print_cluster_urls() {
  local i
  echo "DATABASE_URL=$(redacted "$DATABASE_URL")"
  echo "DATABASE_TLS_URL=$(redacted "$DATABASE_TLS_URL")"
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    echo "rabbit-$i  $(redacted "${R_URL[i]}")   node ${R_NODE[i]}, management ${R_MGMT_URL[i]}, prometheus http://127.0.0.1:${R_PROM[i]}/metrics, log ${R_LOG[i]}"
  done
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    echo "search-$i  ${S_URL[i]}   node ${S_NAME[i]} of $SEARCH_CLUSTER (OpenSearch $OPENSEARCH_VERSION), log ${S_LOG[i]}"
  done
  cat <<EOF
RABBITMQ_URL and ELASTICSEARCH_URL name node 1; RABBITMQ_URLS and ELASTICSEARCH_URLS all three; BENALSAM_QUEUE_TYPE=quorum
TLS: PostgreSQL only (BENALSAM_TLS_CA=$TLS_CA); RabbitMQ and OpenSearch run without TLS in cluster mode
component users: $(grep -v '^#' "$RABBIT_PERMISSIONS" 2>/dev/null | cut -f1 | grep . | paste -sd' ' -) (from $RABBIT_PERMISSIONS)
state and logs: $STATE (the nodes in $CLUSTER_DIR)
EOF
}

cmd_status_cluster() {
  local rc=0 i pid first='' running health
  status_postgres || rc=3
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    if pid=$(rabbit_node_pid "$i"); then
      [ -n "$first" ] || first=$i
      echo "rabbit-$i  running   $(redacted "${R_URL[i]}") (node ${R_NODE[i]}, pid $pid; management :${R_MGMT[i]}, prometheus :${R_PROM[i]}, distribution :${R_DIST[i]})"
    else
      echo "rabbit-$i  stopped   node ${R_NODE[i]} (scripts/stack restart-node rabbit $i)"; rc=3
    fi
    echo "          log ${R_LOG[i]}"
  done
  if [ -n "$first" ]; then
    running=$(rabbit_cluster_nodes "$first" running_nodes | paste -sd' ' - || true)
    echo "rabbitmq  cluster   running nodes as ${R_NODE[first]} sees them: ${running:-none (no answer)}"
    [ "$(wc -w <<<"$running")" -eq "$CLUSTER_SIZE" ] || rc=3
  fi
  first=''
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    if pid=$(search_node_pid "$i"); then
      [ -n "$first" ] || first=$i
      echo "search-$i  running   ${S_URL[i]} (node ${S_NAME[i]}, pid $pid; transport :${S_TRANSPORT[i]})"
    else
      echo "search-$i  stopped   node ${S_NAME[i]} (scripts/stack restart-node search $i)"; rc=3
    fi
    echo "          log ${S_LOG[i]}"
  done
  if [ -n "$first" ]; then
    health=$(search_node_health "$first" || true)
    if [ -n "$health" ]; then
      echo "search    cluster   $SEARCH_CLUSTER as ${S_NAME[first]} sees it: status ${health% *}, ${health#* } nodes"
    else
      echo "search    cluster   $SEARCH_CLUSTER: ${S_NAME[first]} does not answer _cluster/health; see ${S_LOG[first]}"
    fi
    case "$health" in green\ "$CLUSTER_SIZE" | yellow\ "$CLUSTER_SIZE") ;; *) rc=3 ;; esac
  fi
  echo "TLS       PostgreSQL only; RabbitMQ and OpenSearch run without TLS in cluster mode"
  echo "state: $STATE (the nodes in $CLUSTER_DIR)"
  return $rc
}

cmd_env_cluster() {
  printf 'export %s=%q\n' \
    DATABASE_URL "$DATABASE_URL" \
    RABBITMQ_URL "${R_URL[1]}" \
    RABBITMQ_URLS "$(joined R_URL)" \
    RABBITMQ_MANAGEMENT_URL "${R_MGMT_URL[1]}" \
    RABBITMQ_MANAGEMENT_URLS "$(joined R_MGMT_URL)" \
    ELASTICSEARCH_URL "${S_URL[1]}" \
    ELASTICSEARCH_URLS "$(joined S_URL)" \
    BENALSAM_QUEUE_TYPE quorum \
    BENALSAM_RABBIT_NODES "$(joined R_NODE)" \
    BENALSAM_SEARCH_NODES "$(joined S_NAME)" \
    BENALSAM_STACK_DIR "$STATE" \
    BENALSAM_TLS_CA "$TLS_CA" \
    BENALSAM_TLS_CLIENT_CERT "$TLS_CLIENT_CERT" \
    BENALSAM_TLS_CLIENT_KEY "$TLS_CLIENT_KEY" \
    DATABASE_TLS_URL "$DATABASE_TLS_URL" \
    BENALSAM_PG_ADMIN_URL "$(pg_admin_url)"
  # No TLS for RabbitMQ and OpenSearch in cluster mode: no URL of a single-node stack stays behind.
  echo 'unset RABBITMQ_TLS_URL ELASTICSEARCH_TLS_URL ELASTICSEARCH_MTLS_URL'
}

# The pid file of a cluster node names its process: kill -9 "$(scripts/stack pid rabbit 2)".
cmd_pid() { # rabbit|search N
  local kind=${1:-} pid
  case "$kind" in rabbit | search) ;; *) die "pid: say rabbit or search, and the node: scripts/stack pid rabbit 2" ;; esac
  node_number "$kind" "${2:-}"
  if [ "$kind" = rabbit ]; then
    pid=$(rabbit_node_pid "$2") || die "RabbitMQ node ${R_NODE[$2]} is not running (pid file ${R_BASE[$2]}/rabbitmq.pid; log ${R_LOG[$2]})"
  else
    pid=$(search_node_pid "$2") || die "OpenSearch node ${S_NAME[$2]} is not running (pid file ${S_PID[$2]}; log ${S_LOG[$2]})"
  fi
  printf '%s\n' "$pid"
}

# Brings node N back (after a kill -9, say) and waits until it is part of its cluster again,
# together with every other node of the kind that runs.
cmd_restart_node() { # rabbit|search N
  local kind=${1:-} i=${2:-} j pid want=() views=()
  case "$kind" in rabbit | search) ;; *) die "restart-node: say rabbit or search, and the node: scripts/stack restart-node rabbit 2" ;; esac
  node_number "$kind" "$i"
  lock_state
  if [ "$kind" = rabbit ]; then
    [ -f "${R_BASE[i]}/rabbitmq.conf" ] || die "RabbitMQ node ${R_NODE[i]} was never set up in $CLUSTER_DIR: run scripts/stack up --cluster"
    ensure_cluster_cookie
    own_state
    if pid=$(rabbit_node_pid "$i"); then
      say "RabbitMQ node ${R_NODE[i]} runs already (pid $pid)"
    else
      await_node_released rabbit "$i"
      start_rabbit_node "$i"
    fi
    await_rabbit_node "$i" 300
    want=("${R_NODE[i]}") views=("$i")
    for ((j = 1; j <= CLUSTER_SIZE; j++)); do
      if [ "$j" -ne "$i" ] && rabbit_node_pid "$j" >/dev/null; then want+=("${R_NODE[j]}") views+=("$j"); fi
    done
    # Every running node must count it back, not only itself.
    for j in "${views[@]}"; do await_rabbit_members "$j" 120 "${want[@]}"; done
    if [ ${#views[@]} -eq "$CLUSTER_SIZE" ]; then
      await_rabbit_replicas "$i" 120 "${views[@]}"
    else
      say "RabbitMQ: not all nodes run (${want[*]}): quorum queues keep lacking replicas until they do"
    fi
    say "RabbitMQ node ${R_NODE[i]} (pid $(rabbit_node_pid "$i" || echo '?')) runs in the cluster; running nodes: ${want[*]}"
  else
    search_cluster_formed || die "the OpenSearch cluster of $STATE never formed: run scripts/stack up --cluster"
    if pid=$(search_node_pid "$i"); then
      say "OpenSearch node ${S_NAME[i]} runs already (pid $pid)"
    else
      await_node_released search "$i"
      start_search_node "$i"
      wait_search_launchers
    fi
    want=("$i")
    for ((j = 1; j <= CLUSTER_SIZE; j++)); do
      if [ "$j" -ne "$i" ] && search_node_pid "$j" >/dev/null; then want+=("$j"); fi
    done
    await_search_cluster "$i" "${#want[@]}" 300
    # Yellow while the shard copies on the node recover; wait a while for green (an index
    # with more replicas than nodes stays yellow: say so, and go on).
    if [ ${#want[@]} -eq "$CLUSTER_SIZE" ] \
      && ! curl -sS -m 70 "${S_URL[i]}/_cluster/health?wait_for_status=green&timeout=60s" 2>/dev/null | grep -q '"status":"green"'; then
      say "OpenSearch: $SEARCH_CLUSTER is not green 60 s after ${S_NAME[i]} came back (shards still recovering, or an index asks for more replicas than nodes); see _cluster/allocation/explain"
    fi
    curl -fsS -m 10 -H 'content-type: application/json' "${S_URL[i]}/_analyze" \
      -d '{"analyzer":"turkish","text":"kitaplar"}' 2>/dev/null | grep -q '"token":"kitap"' \
      || die "OpenSearch node ${S_NAME[i]} lacks the turkish analyzer (module analysis-common); see ${S_LOG[i]}"
    say "OpenSearch node ${S_NAME[i]} (pid $(search_node_pid "$i" || echo '?')) runs in the cluster; $SEARCH_CLUSTER: $(search_node_health "$i" | sed 's/ /, number_of_nodes /')"
  fi
}

# A node killed a moment ago (kill -9) holds its ports, and a RabbitMQ node its epmd name, until
# the kernel has closed its sockets: wait for that, up to 30 s (then the start names the port).
await_node_released() { # rabbit|search N
  local specs spec busy deadline=$((SECONDS + 30))
  if [ "$1" = rabbit ]; then mapfile -t specs < <(rabbit_node_ports "$2"); else mapfile -t specs < <(search_node_ports "$2"); fi
  while [ $SECONDS -lt $deadline ]; do
    busy=
    for spec in "${specs[@]}"; do port_busy "${spec%%:*}" && busy=1; done
    if [ "$1" = rabbit ] && epmd -names 2>/dev/null | grep -q "^name $STACK_NAME-$2 at port"; then busy=1; fi
    [ -n "$busy" ] || return 0
    sleep 0.2
  done
}

# pid and restart-node: the folder must hold a cluster.
use_cluster_folder() {
  resolve_state_dir
  [ -f "$STATE/cluster/settings" ] \
    || die "no cluster in $STATE: start one with 'scripts/stack up --cluster', and give this command the same BENALSAM_STACK_DIR (scripts/stack env exports it)"
  use_cluster
}
