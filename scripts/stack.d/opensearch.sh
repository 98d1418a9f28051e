# shellcheck shell=bash
# Sourced by scripts/stack.
#
# OpenSearch: one node of the integration-test zip with the analysis-common module.
#
# Search: Elasticsearch's integration-test zip on Maven Central lacks the analysis-common
# module (the turkish analyzer, stemmer, stop and language lowercase filters), and Elasticsearch
# publishes no such module there. OpenSearch publishes both its integration-test zip and its
# analysis-common module on Maven Central, so the stack runs OpenSearch with that module and
# serves the product's real mapping. The Rust client speaks to both alike. That zip has no
# security plugin, hence the TLS relay.

java_home() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then
    printf '%s' "$JAVA_HOME"
  elif command -v java >/dev/null 2>&1; then
    dirname "$(dirname "$(readlink -f "$(command -v java)")")"
  fi
}

# Downloads one Maven Central artifact with Maven into $STATE/downloads.
fetch_artifact() { # group:artifact:version:type file
  local coords=$1 file=$2
  [ -s "$STATE/downloads/$file" ] && return 0
  mkdir -p "$STATE/downloads"
  say "downloading $coords"
  mvn -q -B dependency:copy -Dartifact="$coords" -DoutputDirectory="$STATE/downloads" \
    >"$STATE/downloads/mvn.log" 2>&1 || die "could not download $coords; see $STATE/downloads/mvn.log"
}

install_opensearch() {
  [ -f "$SEARCH_HOME/modules/analysis-common/plugin-descriptor.properties" ] && return 0
  fetch_artifact "org.opensearch.distribution.integ-test-zip:opensearch:$OPENSEARCH_VERSION:zip" \
    "opensearch-$OPENSEARCH_VERSION.zip"
  fetch_artifact "org.opensearch.plugin:analysis-common:$OPENSEARCH_VERSION:jar" \
    "analysis-common-$OPENSEARCH_VERSION.jar"
  rm -rf "$SEARCH_HOME"
  unzip -q "$STATE/downloads/opensearch-$OPENSEARCH_VERSION.zip" -d "$STATE"
  # A module is a folder with its jar and a descriptor; the published jar has no descriptor.
  local module=$SEARCH_HOME/modules/analysis-common
  mkdir -p "$module"
  cp "$STATE/downloads/analysis-common-$OPENSEARCH_VERSION.jar" "$module/"
  cat >"$module/plugin-descriptor.properties" <<EOF
description=Common analysis components (turkish analyzer, stemmer, stop, lowercase)
version=$OPENSEARCH_VERSION
name=analysis-common
classname=org.opensearch.analysis.common.CommonAnalysisPlugin
java.version=11
opensearch.version=$OPENSEARCH_VERSION
custom.foldername=
extended.plugins=
has.native.controller=false
EOF
}

search_pid() { [ -s "$SEARCH_PID" ] && cat "$SEARCH_PID"; }

search_running() { local pid; pid=$(search_pid) && kill -0 "$pid" 2>/dev/null; }

search_health() {
  if [ "$SEARCH_ENGINE" = elasticsearch ]; then es_health; return; fi
  curl -fsS -m 5 "$ELASTICSEARCH_URL/_cluster/health" 2>/dev/null | grep -oE '"status":"[a-z]+"' | cut -d'"' -f4
}

start_search() {
  if [ "$SEARCH_ENGINE" = elasticsearch ]; then start_elasticsearch; return; fi
  install_opensearch
  mkdir -p "$SEARCH_DATA" "$SEARCH_LOGS"; own_state
  if ! search_running; then
    port_busy "$SEARCH_PORT" && die "search: port $SEARCH_PORT is taken by another server; stop it or set BENALSAM_SEARCH_PORT"
    ports_free search "$SEARCH_TRANSPORT_PORT:BENALSAM_SEARCH_TRANSPORT_PORT"
    local jhome; jhome=$(java_home)
    [ -n "$jhome" ] || die "search: no Java found; install openjdk-17-jre-headless or set JAVA_HOME"
    say "starting OpenSearch $OPENSEARCH_VERSION $SEARCH_NAME on 127.0.0.1:$SEARCH_PORT, transport :$SEARCH_TRANSPORT_PORT (heap $SEARCH_HEAP)"
    rm -f "$SEARCH_PID"
    (as_service env \
      OPENSEARCH_JAVA_HOME="$jhome" \
      OPENSEARCH_JAVA_OPTS="-Xms$SEARCH_HEAP -Xmx$SEARCH_HEAP" \
      "$SEARCH_HOME/bin/opensearch" -d -p "$SEARCH_PID" \
        -Ecluster.name="$SEARCH_NAME" \
        -Enode.name="$SEARCH_NAME" \
        -Ediscovery.type=single-node \
        -Enetwork.host=127.0.0.1 \
        -Ehttp.port="$SEARCH_PORT" \
        -Etransport.port="$SEARCH_TRANSPORT_PORT" \
        -Epath.data="$SEARCH_DATA" \
        -Epath.logs="$SEARCH_LOGS" \
        -Ecluster.routing.allocation.disk.threshold_enabled=false \
        >"$SEARCH_OUT" 2>&1) || die "OpenSearch did not start; see $SEARCH_OUT and $SEARCH_LOG"
  fi
  local deadline=$((SECONDS + 180)) status=
  while :; do
    status=$(search_health || true)
    case "$status" in green|yellow) break ;; esac
    # The daemon writes its pid file a moment after the launcher returns.
    if [ -s "$SEARCH_PID" ] && ! search_running; then
      die "OpenSearch exited while starting; see $SEARCH_LOG and $SEARCH_OUT"
    fi
    [ $SECONDS -lt $deadline ] || die "OpenSearch is not yellow or green after 180 s (status '${status:-no answer}'); see $SEARCH_LOG"
    sleep 1
  done
}

check_search() {
  if [ "$SEARCH_ENGINE" = elasticsearch ]; then check_elasticsearch; return; fi
  local status; status=$(search_health || true)
  case "$status" in green|yellow) ;; *) die "OpenSearch cluster health is '${status:-no answer}'; see $SEARCH_LOG" ;; esac
  curl -fsS -m 10 -H 'content-type: application/json' "$ELASTICSEARCH_URL/_analyze" \
    -d '{"analyzer":"turkish","text":"kitaplar"}' 2>/dev/null | grep -q '"token":"kitap"' \
    || die "OpenSearch lacks the turkish analyzer (module analysis-common); see $SEARCH_LOG"
}

stop_search() {
  if search_running; then
    say "stopping the search node ($(search_engine_label))"
    local pid; pid=$(search_pid)
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$SEARCH_PID"
}
