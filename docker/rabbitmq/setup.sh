#!/bin/sh
# Loads the generated topology (definitions.json) into RabbitMQ and creates the components'
# users with the least privileges of permissions.tsv, through the management API. Run by the
# compose file's rabbitmq-setup service; the tests run it against the local stack.
#
#   RABBITMQ_API       management API base      (default http://rabbitmq:15672/api)
#   RABBITMQ_ADMIN     user:password allowed to do it (default benalsam:benalsam123)
#   RABBITMQ_VHOST     vhost of the permissions, URL-encoded (default %2f; the definitions
#                      name their own vhost)
#   COMPONENT_PASSWORD password of benalsam-bridge and benalsam-consumer (default benalsam123)
#   DEFINITIONS        the definitions file, beside this script (default definitions.json;
#                      definitions.quorum.json for BENALSAM_QUEUE_TYPE=quorum)
set -eu
api=${RABBITMQ_API:-http://rabbitmq:15672/api}
admin=${RABBITMQ_ADMIN:-benalsam:benalsam123}
vhost=${RABBITMQ_VHOST:-%2f}
password=${COMPONENT_PASSWORD:-benalsam123}
here=$(dirname "$0")
definitions=${DEFINITIONS:-definitions.json}

call() { # method path [json]
  if [ $# -gt 2 ]; then
    curl -fsS -u "$admin" -H content-type:application/json -X "$1" --data "$3" "$api$2"
  else
    curl -fsS -u "$admin" -H content-type:application/json -X "$1" --data-binary @"$here/$definitions" "$api$2"
  fi
}
# A regular expression as a JSON string: backslashes and quotes escaped.
json() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }

call POST /definitions
tab=$(printf '\t')
grep -v '^#' "$here/permissions.tsv" | while IFS="$tab" read -r user configure write read; do
  [ -n "$user" ] || continue
  call PUT "/users/$user" "{\"password\":\"$password\",\"tags\":\"\"}"
  call PUT "/permissions/$vhost/$user" \
    "{\"configure\":\"$(json "$configure")\",\"write\":\"$(json "$write")\",\"read\":\"$(json "$read")\"}"
  echo "user $user: configure $configure, write $write, read $read"
done
