# shellcheck shell=bash
# Sourced by scripts/stack.
#
# Cluster mode, OpenSearch: three nodes of one cluster (see cluster.sh).

search_node_ports() { # N: its ports as port:VARIABLE
  local s; s=$(port_suffix $(($1 - 1)))
  printf '%s\n' "${S_HTTP[$1]}:BENALSAM_SEARCH_PORT$s" "${S_TRANSPORT[$1]}:BENALSAM_SEARCH_TRANSPORT_PORT$s"
}

# Node N's configuration folder, a copy of the distribution's made once: its own keystore
# (nodes sharing one folder race to create it: FileAlreadyExistsException
# opensearch.keystore.tmp), and the GC log, heap dumps and crash files in the node's folders
# rather than in logs/ and data/ of the shared distribution.
write_search_node_config() { # N
  local conf=${S_DIR[$1]}/config
  [ -f "$conf/jvm.options" ] && return 0
  rm -rf "$conf.new"
  cp -r "$SEARCH_HOME/config" "$conf.new"
  rm -f "$conf.new/opensearch.keystore"
  sed -i -e "s#logs/gc\.log#${S_LOGS[$1]}/gc.log#g" \
    -e "s#^-XX:HeapDumpPath=data\$#-XX:HeapDumpPath=${S_DIR[$1]}#" \
    -e "s#^-XX:ErrorFile=logs/#-XX:ErrorFile=${S_LOGS[$1]}/#" "$conf.new/jvm.options"
  mv "$conf.new" "$conf"
}

# Launches OpenSearch node N in the background; wait_search_launchers waits for the launchers
# (the nodes take longer: await_search_cluster). Only a cluster that never formed is
# bootstrapped: cluster.initial_cluster_manager_nodes must not be given to a formed cluster.
start_search_node() { # N [bootstrap]
  local i=$1 bootstrap=${2:-} specs jhome how seeds=() names=() j
  mapfile -t specs < <(search_node_ports "$i")
  ports_free "search node ${S_NAME[i]}" "${specs[@]}"
  jhome=$(java_home)
  [ -n "$jhome" ] || die "search: no Java found; install openjdk-17-jre-headless or set JAVA_HOME"
  for ((j = 1; j <= CLUSTER_SIZE; j++)); do seeds+=("127.0.0.1:${S_TRANSPORT[j]}") names+=("${S_NAME[j]}"); done
  local args=(
    -Ecluster.name="$SEARCH_CLUSTER" -Enode.name="${S_NAME[i]}" -Enetwork.host=127.0.0.1
    -Ehttp.port="${S_HTTP[i]}" -Etransport.port="${S_TRANSPORT[i]}"
    -Epath.data="${S_DATA[i]}" -Epath.logs="${S_LOGS[i]}"
    -Ediscovery.seed_hosts="$(joined seeds)"
    -Ecluster.routing.allocation.disk.threshold_enabled=false
  )
  how="joining through discovery.seed_hosts"
  if [ -n "$bootstrap" ]; then
    args+=(-Ecluster.initial_cluster_manager_nodes="$(joined names)")
    how="bootstrapping a new cluster"
  fi
  mkdir -p "${S_DATA[i]}" "${S_LOGS[i]}"
  write_search_node_config "$i"
  own_state
  say "starting OpenSearch node ${S_NAME[i]} on 127.0.0.1:${S_HTTP[i]}, transport :${S_TRANSPORT[i]} (heap $SEARCH_HEAP, $how); log ${S_LOG[i]}"
  rm -f "${S_PID[i]}"
  (as_service env \
    OPENSEARCH_JAVA_HOME="$jhome" \
    OPENSEARCH_PATH_CONF="${S_DIR[i]}/config" \
    OPENSEARCH_JAVA_OPTS="-Xms$SEARCH_HEAP -Xmx$SEARCH_HEAP" \
    "$SEARCH_HOME/bin/opensearch" -d -p "${S_PID[i]}" "${args[@]}" >"${S_OUT[i]}" 2>&1) &
  SEARCH_LAUNCHERS[i]=$!
  SEARCH_STARTED+=("$i")
}

wait_search_launchers() {
  local i
  for i in "${!SEARCH_LAUNCHERS[@]}"; do
    wait "${SEARCH_LAUNCHERS[i]}" || die "OpenSearch node ${S_NAME[i]} did not start; see ${S_OUT[i]} and ${S_LOG[i]}"
  done
  SEARCH_LAUNCHERS=()
}

# "status number_of_nodes" from node N's _cluster/health, or nothing.
search_node_health() { # N
  local out status nodes
  out=$(curl -fsS -m 5 "${S_URL[$1]}/_cluster/health" 2>/dev/null) || return 1
  status=$(grep -oE '"status":"[a-z]+"' <<<"$out" | cut -d'"' -f4) || return 1
  nodes=$(grep -oE '"number_of_nodes":[0-9]+' <<<"$out" | cut -d: -f2) || return 1
  printf '%s %s\n' "$status" "$nodes"
}

# Waits until node N reports at least WANT nodes, yellow or green.
await_search_cluster() { # N want seconds
  local i=$1 want=$2 deadline=$((SECONDS + $3)) health j
  while :; do
    health=$(search_node_health "$i" || true)
    case "$health" in green\ * | yellow\ *) [ "${health#* }" -lt "$want" ] || return 0 ;; esac
    for j in "${SEARCH_STARTED[@]}"; do
      # Before its pid file, the java of the node is known by its command line.
      if ! search_node_pid "$j" >/dev/null \
        && ! grep -qzxF -- "-Epath.data=${S_DATA[j]}" /proc/[0-9]*/cmdline 2>/dev/null; then
        die "OpenSearch node ${S_NAME[j]} exited while starting; see ${S_OUT[j]} and ${S_LOG[j]}"
      fi
    done
    [ $SECONDS -lt "$deadline" ] \
      || die "OpenSearch: node ${S_NAME[i]} reports '${health:-no answer}' (status nodes) after $3 s, not $want nodes yellow or green; see ${S_LOG[i]} and the other nodes' logs in $CLUSTER_DIR/search-*/logs"
    sleep 1
  done
}

# A cluster that formed once keeps its state in the nodes' data folders; without any, it is
# new again and bootstraps.
search_cluster_formed() {
  [ -f "$SEARCH_FORMED" ] || return 1
  local i
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do [ -d "${S_DATA[i]}/nodes" ] && return 0; done
  say "OpenSearch: $SEARCH_FORMED says the cluster formed, but no node has data: bootstrapping anew"
  rm -f "$SEARCH_FORMED"
  return 1
}

start_search_cluster() {
  install_opensearch
  local i bootstrap=
  search_cluster_formed || bootstrap=1
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    search_node_pid "$i" >/dev/null || start_search_node "$i" "$bootstrap"
  done
}

start_search_cluster_wait() {
  wait_search_launchers
  await_search_cluster 1 "$CLUSTER_SIZE" 300
  if [ ! -f "$SEARCH_FORMED" ]; then
    local uuid
    uuid=$(curl -fsS -m 5 "${S_URL[1]}/" 2>/dev/null | grep -oE '"cluster_uuid" *: *"[^"]+"' | cut -d'"' -f4) || uuid='?'
    say "OpenSearch: cluster $SEARCH_CLUSTER formed (uuid $uuid); later starts do not bootstrap"
    printf 'cluster %s uuid %s formed %s\n' "$SEARCH_CLUSTER" "$uuid" "$(date -u +%FT%TZ)" >"$SEARCH_FORMED"
  fi
}

# Every node answers, and has the turkish analyzer (module analysis-common).
check_search_cluster() {
  local i health
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    health=$(search_node_health "$i" || true)
    case "$health" in
      green\ "$CLUSTER_SIZE" | yellow\ "$CLUSTER_SIZE") ;;
      *) die "OpenSearch node ${S_NAME[i]} reports '${health:-no answer}' (status nodes), not $CLUSTER_SIZE nodes yellow or green; see ${S_LOG[i]}" ;;
    esac
    curl -fsS -m 10 -H 'content-type: application/json' "${S_URL[i]}/_analyze" \
      -d '{"analyzer":"turkish","text":"kitaplar"}' 2>/dev/null | grep -q '"token":"kitap"' \
      || die "OpenSearch node ${S_NAME[i]} lacks the turkish analyzer (module analysis-common); see ${S_LOG[i]}"
  done
}

# Stops the running OpenSearch nodes together.
stop_search_nodes() {
  local i pid pids=()
  for ((i = 1; i <= CLUSTER_SIZE; i++)); do
    if pid=$(search_node_pid "$i"); then
      say "stopping OpenSearch node ${S_NAME[i]} (pid $pid)"
      kill "$pid" 2>/dev/null || true
      pids[i]=$pid
    fi
  done
  for i in "${!pids[@]}"; do
    for _ in $(seq 1 60); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "${pids[i]}" 2>/dev/null; then
      say "OpenSearch node ${S_NAME[i]} still runs after 30 s; killing it (see ${S_LOG[i]})"
      kill -9 "${pids[i]}" 2>/dev/null || true
    fi
    rm -f "${S_PID[i]}"
  done
}
