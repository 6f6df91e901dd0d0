#!/usr/bin/env bash
# Start, stop or show the external processes the integration tests need: a single-node Kafka
# broker (KRaft, no ZooKeeper) and PostgreSQL, both on 127.0.0.1 only, state under .cache/infra/.
#
#   scripts/infra.sh start    # idempotent: reuses what is already running
#   source .cache/infra/env   # RLHF_TEST_KAFKA_BOOTSTRAP, RLHF_TEST_DATABASE_URL
#   scripts/infra.sh status
#   scripts/infra.sh stop     # stops both and deletes their data
#
# Environment:
#   RLHF_TEST_INFRA=none    do nothing (use your own servers: set the two variables above yourself;
#                           tests that need them are skipped while they are unset)
#   RLHF_TEST_KAFKA_PORT    broker port (default 19092); the KRaft controller uses the next one
#   RLHF_TEST_PG_PORT       PostgreSQL port (default 15432)
#
# Kafka's jars (version pinned in deploy/kafka/pom.xml) are fetched once with Maven into
# .cache/kafka/lib; Java 17 and Maven must be installed. PostgreSQL's binaries are looked up on
# PATH and in /usr/lib/postgresql/*/bin, and installed with apt-get when missing. As root, the
# database runs as the `postgres` OS user (initdb refuses root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

KAFKA_PORT="${RLHF_TEST_KAFKA_PORT:-19092}"
CONTROLLER_PORT="$((KAFKA_PORT + 1))"
PG_PORT="${RLHF_TEST_PG_PORT:-15432}"
STATE="$ROOT/.cache/infra"
KLIB="$ROOT/.cache/kafka/lib"
KDIR="$STATE/kafka"
PGDATA="$STATE/pg"
PGRUN="$STATE/pgrun"  # unix socket and server log
PG_DB=rlhf_test
START_TIMEOUT="${RLHF_TEST_INFRA_TIMEOUT:-90}"

log() { echo "[infra] $*" >&2; }
die() { echo "[infra] error: $*" >&2; exit 1; }

if [ "${RLHF_TEST_INFRA:-}" = "none" ]; then
  log "RLHF_TEST_INFRA=none: not managing Kafka or PostgreSQL"
  exit 0
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------------------------------- Kafka

kafka_pid() {  # prints the broker's pid when it is running
  local pid
  [ -f "$KDIR/kafka.pid" ] || return 1
  pid="$(cat "$KDIR/kafka.pid")"
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  echo "$pid"
}

fetch_kafka_jars() {
  local stamp="$KLIB/.pom-$(sha256sum deploy/kafka/pom.xml | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed once to fetch Kafka's jars (apt-get install maven)"
  log "fetching the Kafka broker's jars with Maven into .cache/kafka/lib (once)"
  rm -rf "$KLIB.tmp"
  mkdir -p "$ROOT/.cache/kafka"
  mvn -B -q -f deploy/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory="$KLIB.tmp" \
    >"$ROOT/.cache/kafka/mvn.out" 2>&1 \
    || { tail -30 "$ROOT/.cache/kafka/mvn.out" >&2; die "mvn dependency:copy-dependencies failed (is Maven Central reachable?)"; }
  touch "$KLIB.tmp/.pom-$(sha256sum deploy/kafka/pom.xml | cut -c1-16)"
  rm -rf "$KLIB"
  mv "$KLIB.tmp" "$KLIB"
}

kafka_ready() {  # the broker answers and a topic can be created
  port_open "$KAFKA_PORT" || return 1
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import confluent_kafka' 2>/dev/null; then
    .venv/bin/python - "127.0.0.1:$KAFKA_PORT" <<'EOF' 2>/dev/null
import sys
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

admin = AdminClient({"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 5000})
try:
    admin.create_topics([NewTopic("rlhf.infra.ready", 1, 1)], request_timeout=10)["rlhf.infra.ready"].result(15)
except KafkaException as e:
    if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
        sys.exit(1)
sys.exit(0 if "rlhf.infra.ready" in admin.list_topics(timeout=10).topics else 1)
EOF
  fi
}

start_kafka() {
  local pid java=(java -Xms128m -Xmx512m -XX:+UseSerialGC -Djava.awt.headless=true -cp "$KLIB/*")
  if pid="$(kafka_pid)"; then
    [ "$(cat "$KDIR/port" 2>/dev/null)" = "$KAFKA_PORT" ] \
      || die "Kafka already runs on port $(cat "$KDIR/port" 2>/dev/null) (pid $pid), not $KAFKA_PORT: stop it first"
    log "Kafka already running (pid $pid, port $KAFKA_PORT)"
  else
    command -v java >/dev/null || die "Java 17+ is needed for the Kafka broker (apt-get install openjdk-17-jre-headless)"
    port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is in use by another process (set RLHF_TEST_KAFKA_PORT)"
    port_open "$CONTROLLER_PORT" && die "port $CONTROLLER_PORT is in use by another process (set RLHF_TEST_KAFKA_PORT)"
    fetch_kafka_jars
    rm -rf "$KDIR"
    mkdir -p "$KDIR/data"
    sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" \
        -e "s|@LOG_DIR@|$KDIR/data|g" deploy/kafka/server.properties >"$KDIR/server.properties"
    local cluster_id
    cluster_id="$("${java[@]}" kafka.tools.StorageTool random-uuid)"
    # static quorum (controller.quorum.voters): format without --standalone
    "${java[@]}" -Dlog4j2.configurationFile="$ROOT/deploy/kafka/log4j2.yaml" -Dkafka.logs.dir="$KDIR" \
      kafka.tools.StorageTool format -t "$cluster_id" -c "$KDIR/server.properties" >"$KDIR/format.out" 2>&1 \
      || { tail -20 "$KDIR/format.out" >&2; die "formatting the KRaft storage failed"; }
    log "starting Kafka on 127.0.0.1:$KAFKA_PORT (log: .cache/infra/kafka/server.log)"
    nohup "${java[@]}" -Dlog4j2.configurationFile="$ROOT/deploy/kafka/log4j2.yaml" -Dkafka.logs.dir="$KDIR" \
      kafka.Kafka "$KDIR/server.properties" >"$KDIR/broker.out" 2>&1 </dev/null 9>&- &
    echo $! >"$KDIR/kafka.pid"
    echo "$KAFKA_PORT" >"$KDIR/port"
  fi
  local waited=0
  until kafka_ready; do
    if ! kafka_pid >/dev/null; then
      tail -30 "$KDIR/broker.out" "$KDIR/server.log" >&2 2>/dev/null || true
      die "the Kafka broker exited during start (logs above)"
    fi
    if [ "$waited" -ge "$START_TIMEOUT" ]; then
      tail -30 "$KDIR/server.log" >&2 2>/dev/null || tail -30 "$KDIR/broker.out" >&2 || true
      die "Kafka did not accept connections and create a topic within ${START_TIMEOUT}s (log tail above)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

stop_kafka() {
  local pid i
  if pid="$(kafka_pid)"; then
    log "stopping Kafka (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$KDIR"
}

# ----------------------------------------------------------------------------------- PostgreSQL

PGBIN=""
find_pg_bin() {
  local d
  if command -v initdb >/dev/null; then
    d="$(dirname "$(readlink -f "$(command -v initdb)")")"
    [ -x "$d/pg_ctl" ] && { PGBIN="$d"; return 0; }
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { PGBIN="$d"; return 0; }
  done
  return 1
}

as_pg() {  # run a PostgreSQL command; as the postgres OS user when we are root
  if [ "$(id -u)" -eq 0 ]; then
    if command -v runuser >/dev/null; then runuser -u postgres -- "$@"
    else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
  else
    "$@"
  fi
}

pg_running() { [ -n "$PGBIN" ] && [ -f "$PGDATA/PG_VERSION" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

start_pg() {
  if ! find_pg_bin; then
    [ "$(id -u)" -eq 0 ] || die "PostgreSQL is not installed (sudo apt-get install -y postgresql)"
    log "installing PostgreSQL with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2 || die "apt-get install postgresql failed"
    find_pg_bin || die "initdb/pg_ctl not found after installing postgresql"
  fi
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' OS user (the Debian package creates it)"
  fi
  if pg_running; then
    [ "$(cat "$STATE/pg.port" 2>/dev/null)" = "$PG_PORT" ] \
      || die "PostgreSQL already runs on port $(cat "$STATE/pg.port" 2>/dev/null), not $PG_PORT: stop it first"
    log "PostgreSQL already running (port $PG_PORT)"
  else
    port_open "$PG_PORT" && die "port $PG_PORT is in use by another process (set RLHF_TEST_PG_PORT)"
    rm -rf "$PGDATA" "$PGRUN"
    mkdir -p "$PGDATA" "$PGRUN"
    chmod 700 "$PGDATA"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$PGDATA" "$PGRUN"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale >"$STATE/initdb.out" 2>&1 \
      || { tail -20 "$STATE/initdb.out" >&2; die "initdb failed"; }
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: .cache/infra/pgrun/postgres.log)"
    # durability off: the data is thrown away after the tests
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGRUN/postgres.log" -w -t "$START_TIMEOUT" \
      -o "-p $PG_PORT -k $PGRUN -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >&2 9>&- || { tail -30 "$PGRUN/postgres.log" >&2 || true; die "PostgreSQL did not start"; }
    echo "$PG_PORT" >"$STATE/pg.port"
  fi
  if ! as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$PG_DB" || die "createdb $PG_DB failed"
  fi
}

stop_pg() {
  find_pg_bin || true
  if pg_running; then
    log "stopping PostgreSQL"
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >&2 || true
  fi
  rm -rf "$PGDATA" "$PGRUN" "$STATE/pg.port"
}

# ----------------------------------------------------------------------------------------- main

# one start/stop at a time per checkout (the servers are started with fd 9 closed, so that they
# do not hold the lock)
mkdir -p "$ROOT/.cache"
if command -v flock >/dev/null; then
  exec 9>"$ROOT/.cache/infra.lock"
  flock 9
fi

case "${1:-}" in
  start)
    mkdir -p "$STATE"
    chmod 755 "$STATE"  # the postgres OS user must reach pg/ and pgrun/ inside
    start_kafka
    start_pg
    cat >"$STATE/env" <<EOF
# written by scripts/infra.sh start; source it before running the integration tests
export RLHF_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
export RLHF_TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/$PG_DB
EOF
    log "ready: source .cache/infra/env"
    ;;
  stop)
    stop_kafka
    stop_pg
    rm -rf "$STATE"
    ;;
  status)
    rc=0
    if pid="$(kafka_pid)"; then echo "kafka: running (pid $pid, 127.0.0.1:$(cat "$KDIR/port" 2>/dev/null))"
    else echo "kafka: stopped"; rc=1; fi
    find_pg_bin || true
    if pg_running; then echo "postgresql: running (127.0.0.1:$(cat "$STATE/pg.port" 2>/dev/null), database $PG_DB)"
    else echo "postgresql: stopped"; rc=1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
