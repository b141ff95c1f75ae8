#!/usr/bin/env bash
# Local, real ClickHouse 26.9 (chdb-core) and a MongoDB-wire server (SecantusDB) on loopback.
#
#   scripts/services.sh start|stop|status|env [dev|test]
#
# Installs pinned Python packages into venvs under .local/venv (once; reused afterwards),
# keeps each profile's data under .local/<profile>/, records PIDs there and stops by PID.
# `env` prints the ROSTER_* variables that point the server at that profile's services.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="${ROSTER_LOCAL_DIR:-$ROOT/.local}"
PYTHON="${PYTHON:-python3}"
CHDB_PIN="chdb-core==26.9.0"
SECANTUS_PIN="SecantusDB==0.7.0b3"

cmd="${1:-status}"
profile="${2:-dev}"

# Default ports stay clear of a user's own servers (8123/9000/27017).
case "$profile" in
  dev)  def_http=18123; def_tcp=19100; def_mongo=27117 ;;
  test) def_http=28123; def_tcp=29100; def_mongo=27217 ;;
  *) echo "unknown profile '$profile' (dev|test)" >&2; exit 2 ;;
esac
PROFILE_UPPER="$(echo "$profile" | tr '[:lower:]' '[:upper:]')"
var() { local name="ROSTER_${PROFILE_UPPER}_$1"; echo "${!name:-$2}"; }
CH_HTTP_PORT="$(var CH_HTTP_PORT "$def_http")"
CH_TCP_PORT="$(var CH_TCP_PORT "$def_tcp")"
MONGO_PORT="$(var MONGO_PORT "$def_mongo")"

DIR="$LOCAL/$profile"
CH_VENV="$LOCAL/venv/chdb"
MG_VENV="$LOCAL/venv/secantus"

log() { echo "services[$profile]: $*" >&2; }

install_venv() { # dir pin pip-args...
  local dir="$1" pin="$2"; shift 2
  local marker="$dir/.installed-${pin//[^A-Za-z0-9.=_-]/_}"
  [ -f "$marker" ] && return 0
  log "installing $pin into $dir"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" "$pin"
  touch "$marker"
}

install() {
  mkdir -p "$LOCAL/venv"
  exec 9>"$LOCAL/venv/.lock"
  flock 9
  install_venv "$CH_VENV" "$CHDB_PIN" --no-deps
  install_venv "$MG_VENV" "$SECANTUS_PIN"
  flock -u 9
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ch_ready() {
  "$CH_VENV/bin/python" - "$CH_HTTP_PORT" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/?query=SELECT%201", timeout=2) as r:
    sys.exit(0 if r.read().strip() == b"1" else 1)
PY
}

mongo_ready() {
  "$MG_VENV/bin/python" - "$MONGO_PORT" <<'PY' 2>/dev/null
import sys, pymongo
c = pymongo.MongoClient(f"mongodb://127.0.0.1:{sys.argv[1]}/?directConnection=true", serverSelectionTimeoutMS=2000)
c.admin.command("ping")
PY
}

wait_for() { # name check-fn pidfile logfile
  local name="$1" check="$2" pidfile="$3" logfile="$4"
  for _ in $(seq 1 240); do
    if "$check"; then return 0; fi
    if ! alive "$pidfile"; then
      log "$name exited during start-up; last log lines:"; tail -20 "$logfile" >&2 || true
      return 1
    fi
    sleep 0.5
  done
  log "$name did not become ready in 120 s; last log lines:"; tail -20 "$logfile" >&2 || true
  return 1
}

start_clickhouse() {
  local pidfile="$DIR/clickhouse.pid" logfile="$DIR/clickhouse.log"
  if alive "$pidfile" && ch_ready; then log "ClickHouse already running on :$CH_HTTP_PORT"; return 0; fi
  mkdir -p "$DIR/clickhouse"
  cat >"$DIR/clickhouse/config.xml" <<XML
<clickhouse>
  <http_port>$CH_HTTP_PORT</http_port>
  <tcp_port>$CH_TCP_PORT</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <logger><level>warning</level><console>1</console></logger>
</clickhouse>
XML
  setsid "$CH_VENV/bin/python" "$ROOT/scripts/chdb_serve.py" "$DIR/clickhouse" >"$logfile" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  wait_for ClickHouse ch_ready "$pidfile" "$logfile"
  log "ClickHouse $("$CH_VENV/bin/python" -c 'import chdb; print(chdb.__version__)' 2>/dev/null || echo 26.9) on 127.0.0.1:$CH_HTTP_PORT (http) / :$CH_TCP_PORT (tcp)"
}

start_mongo() {
  local pidfile="$DIR/mongo.pid" logfile="$DIR/mongo.log"
  if alive "$pidfile" && mongo_ready; then log "MongoDB-wire server already running on :$MONGO_PORT"; return 0; fi
  mkdir -p "$DIR/mongo"
  setsid "$MG_VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" --standalone \
    --storage-path "$DIR/mongo" --log-level WARNING >"$logfile" 2>&1 < /dev/null &
  echo $! >"$pidfile"
  wait_for MongoDB mongo_ready "$pidfile" "$logfile"
  log "SecantusDB (MongoDB wire) on 127.0.0.1:$MONGO_PORT"
}

stop_one() { # name pidfile
  local name="$1" pidfile="$2"
  if ! alive "$pidfile"; then rm -f "$pidfile"; return 0; fi
  local pid; pid="$(cat "$pidfile")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then log "$name ignored SIGTERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$pidfile"
  log "$name stopped"
}

print_env() {
  # SecantusDB can stall for seconds (big documents, index builds under parallel tests);
  # the driver's default 10 s connect/monitor timeout then drops every pooled connection.
  echo "export ROSTER_MONGO_URI='mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true&connectTimeoutMS=60000'"
  echo "export ROSTER_CLICKHOUSE_URL='http://127.0.0.1:$CH_HTTP_PORT'"
  echo "export ROSTER_CLICKHOUSE_USER='default'"
  echo "export ROSTER_CLICKHOUSE_PASSWORD=''"
}

case "$cmd" in
  start) install; mkdir -p "$DIR"; start_clickhouse; start_mongo ;;
  stop) stop_one ClickHouse "$DIR/clickhouse.pid"; stop_one MongoDB "$DIR/mongo.pid" ;;
  status)
    alive "$DIR/clickhouse.pid" && ch_ready && echo "clickhouse: up on :$CH_HTTP_PORT" || echo "clickhouse: down"
    alive "$DIR/mongo.pid" && mongo_ready && echo "mongo: up on :$MONGO_PORT" || echo "mongo: down" ;;
  env) print_env ;;
  install) install ;;
  *) echo "usage: $0 start|stop|status|env|install [dev|test]" >&2; exit 2 ;;
esac
