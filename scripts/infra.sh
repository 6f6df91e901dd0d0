#!/usr/bin/env bash
# Start, stop or show the external processes the integration tests need: a single-node Kafka
# broker (KRaft, no ZooKeeper) and PostgreSQL, both on 127.0.0.1 only, state under .cache/infra/.
#
#   scripts/infra.sh start [kafka|postgres]    # idempotent: reuses what is already running
#   source .cache/infra/env                    # RLHF_TEST_KAFKA_BOOTSTRAP, RLHF_TEST_DATABASE_URL
#   scripts/infra.sh status
#   scripts/infra.sh stop                      # stops both and deletes their data
#
# For the fault tests (tests/services/test_faults.py), which run servers of their own:
#
#   scripts/infra.sh crash kafka|postgres      # the broker: SIGKILL; PostgreSQL: an immediate
#                                              # shutdown (no checkpoint; crash recovery at restart)
#   scripts/infra.sh restart [kafka|postgres]  # start again on the data that is there
#
# Environment:
#   RLHF_TEST_INFRA=none    do nothing (use your own servers: set the two variables above yourself;
#                           tests that need them are skipped while they are unset)
#   RLHF_TEST_INFRA_DIR     the state directory (default .cache/infra); a second set of servers runs
#                           from a directory of its own, on ports of its own
#   RLHF_TEST_KAFKA_PORT    broker port (default 19092); the KRaft controller uses the next one. When
#                           unset and 19092 or 19093 is taken, the next free pair of 19192, 19292, ...
#   RLHF_TEST_PG_PORT       PostgreSQL port (default 15432; when unset and taken: 15532, 15632, ...)
#   RLHF_TEST_PG_DURABLE=1  PostgreSQL as in production: fsync, synchronous_commit and
#                           full_page_writes on. Default: off (fast; the data is thrown away)
#   RLHF_TEST_KAFKA_SASL=1  the broker takes SCRAM logins (user rlhf, SCRAM-SHA-256 and -512):
#                           SASL_SSL on the broker port (a CA of its own, written to the state
#                           directory) and SASL_PLAINTEXT on the port after the controller's
#   RLHF_TEST_PYTHON        the Python with confluent-kafka that checks the broker (default .venv/bin/python)
#
# Kafka's jars (version pinned in deploy/kafka/pom.xml) are fetched once with Maven into
# .cache/kafka/lib; Java 17 and Maven must be installed. PostgreSQL's binaries are looked up on
# PATH and in /usr/lib/postgresql/*/bin, and installed with apt-get when missing. As root, the
# database runs as the `postgres` OS user (initdb refuses root), so the state directory and its
# parents must be reachable by that user.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

STATE="${RLHF_TEST_INFRA_DIR:-$ROOT/.cache/infra}"
case "$STATE" in /*) ;; *) STATE="$ROOT/$STATE" ;; esac
KLIB="$ROOT/.cache/kafka/lib"
KDIR="$STATE/kafka"
PGDATA="$STATE/pg"
PGRUN="$STATE/pgrun"  # unix socket and server log
PG_DB=rlhf_test
START_TIMEOUT="${RLHF_TEST_INFRA_TIMEOUT:-90}"
PY="${RLHF_TEST_PYTHON:-$ROOT/.venv/bin/python}"
SASL="${RLHF_TEST_KAFKA_SASL:-0}"
DURABLE="${RLHF_TEST_PG_DURABLE:-0}"

log() { echo "[infra] $*" >&2; }
die() { echo "[infra] error: $*" >&2; exit 1; }
# the last lines of each log that exists, on stderr ("tail -30 a b" is not portable: with two
# files GNU tail rejects the obsolete -30 and, with its error hidden, printed nothing)
show_logs() {
  local f
  for f in "$@"; do
    if [ -s "$f" ]; then
      echo "---- last lines of ${f#"$ROOT"/} ----" >&2
      tail -n 40 "$f" >&2
    elif [ -e "$f" ]; then
      echo "---- ${f#"$ROOT"/} is empty ----" >&2
    fi
  done
}

if [ "${RLHF_TEST_INFRA:-}" = "none" ]; then
  log "RLHF_TEST_INFRA=none: not managing Kafka or PostgreSQL"
  exit 0
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_holder() {  # who listens on a port, when ss can tell
  command -v ss >/dev/null || return 0
  ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -1
}
in_use() {  # "port N is in use (by ...)"
  local who
  who="$(port_holder "$1")"
  echo "port $1 is in use${who:+ (by $who)}"
}

# ---------------------------------------------------------------------------------------- Kafka

KAFKA_PORT="${RLHF_TEST_KAFKA_PORT:-}"
kafka_ports() {  # the broker, controller and (with SASL) SASL_PLAINTEXT ports for a broker port
  if [ "$SASL" = 1 ]; then echo "$1 $(($1 + 1)) $(($1 + 2))"; else echo "$1 $(($1 + 1))"; fi
}
kafka_ports_free() {
  local p
  for p in $(kafka_ports "$1"); do port_open "$p" && return 1; done
  return 0
}
pick_kafka_port() {  # $1: a port to avoid (taken meanwhile); sets KAFKA_PORT
  local p
  if [ -n "${RLHF_TEST_KAFKA_PORT:-}" ]; then
    for p in $(kafka_ports "$RLHF_TEST_KAFKA_PORT"); do
      port_open "$p" && die "$(in_use "$p"): set RLHF_TEST_KAFKA_PORT to another port (or unset it)"
    done
    KAFKA_PORT="$RLHF_TEST_KAFKA_PORT"
    return 0
  fi
  for p in $(seq 19092 100 21992); do
    [ "$p" = "${1:-}" ] && continue
    if kafka_ports_free "$p"; then
      [ "$p" = 19092 ] || log "port 19092 or its neighbours are taken: the broker uses $p"
      KAFKA_PORT="$p"
      return 0
    fi
  done
  die "no free ports for the broker among 19092..21992 (step 100): set RLHF_TEST_KAFKA_PORT"
}

kafka_pid() {  # prints the broker's pid when it is running
  local pid
  [ -f "$KDIR/kafka.pid" ] || return 1
  pid="$(cat "$KDIR/kafka.pid")"
  kill -0 "$pid" 2>/dev/null || return 1
  grep -qa 'kafka\.Kafka' "/proc/$pid/cmdline" 2>/dev/null || return 1
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
    || { show_logs "$ROOT/.cache/kafka/mvn.out"; die "mvn dependency:copy-dependencies failed (is Maven Central reachable?)"; }
  touch "$KLIB.tmp/.pom-$(sha256sum deploy/kafka/pom.xml | cut -c1-16)"
  rm -rf "$KLIB"
  mv "$KLIB.tmp" "$KLIB"
}

kafka_ready() {  # the broker answers and a topic can be created (through the SASL_SSL listener with SASL)
  port_open "$(cat "$KDIR/port")" || return 1
  [ -x "$PY" ] && "$PY" -c 'import confluent_kafka' 2>/dev/null || return 0
  "$PY" - "127.0.0.1:$(cat "$KDIR/port")" "$SASL" "$KDIR" <<'EOF' 2>/dev/null
import sys
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

conf = {"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 5000}
if sys.argv[2] == "1":
    d = sys.argv[3]
    conf.update({"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "rlhf",
                 "sasl.password": open(f"{d}/sasl-password").read().strip(), "ssl.ca.location": f"{d}/tls/ca.pem"})
admin = AdminClient(conf)
try:
    admin.create_topics([NewTopic("rlhf.infra.ready", 1, 1)], request_timeout=10)["rlhf.infra.ready"].result(15)
except KafkaException as e:
    if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
        sys.exit(1)
sys.exit(0 if "rlhf.infra.ready" in admin.list_topics(timeout=10).topics else 1)
EOF
}

JAVA=(java -Xms128m -Xmx512m -XX:+UseSerialGC -Djava.awt.headless=true)

kafka_tls() {  # a CA of its own and the broker's certificate (127.0.0.1 and localhost), PEM
  local d="$KDIR/tls"
  command -v openssl >/dev/null || die "openssl is needed for the SASL_SSL test broker"
  mkdir -p "$d"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=rlhf test CA" -keyout "$d/ca.key" -out "$d/ca.pem"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$d/server.key" -out "$d/server.csr"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/san.ext"
    openssl x509 -req -days 7 -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
      -extfile "$d/san.ext" -out "$d/server.crt"
  } >"$d/openssl.out" 2>&1 || { show_logs "$d/openssl.out"; die "creating the test broker's TLS certificate failed"; }
  cat "$d/server.key" "$d/server.crt" >"$d/server.pem"
  chmod 600 "$d/ca.key" "$d/server.key" "$d/server.pem"
}

format_kafka() {  # a fresh KRaft log directory and server.properties for $KAFKA_PORT
  local cluster_id ports
  read -r -a ports <<<"$(kafka_ports "$KAFKA_PORT")"
  rm -rf "$KDIR"
  mkdir -p "$KDIR/data"
  local sed_args=(-e "s|@KAFKA_PORT@|${ports[0]}|g" -e "s|@CONTROLLER_PORT@|${ports[1]}|g" -e "s|@LOG_DIR@|$KDIR/data|g")
  local scram=()
  if [ "$SASL" = 1 ]; then
    kafka_tls
    local user_pw broker_pw
    user_pw="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    broker_pw="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    (umask 077; echo "$user_pw" >"$KDIR/sasl-password")
    sed_args+=(-e "s|@SASL_PLAINTEXT_PORT@|${ports[2]}|g" -e "s|@BROKER_PASSWORD@|$broker_pw|g" -e "s|@TLS_DIR@|$KDIR/tls|g")
    scram=(--add-scram "SCRAM-SHA-256=[name=rlhf,password=$user_pw]" --add-scram "SCRAM-SHA-512=[name=rlhf,password=$user_pw]"
           --add-scram "SCRAM-SHA-512=[name=broker,password=$broker_pw]")
    { cat deploy/kafka/server.properties; echo; cat deploy/kafka/sasl.properties; } | sed "${sed_args[@]}" >"$KDIR/server.properties"
  else
    sed "${sed_args[@]}" deploy/kafka/server.properties >"$KDIR/server.properties"
  fi
  chmod 600 "$KDIR/server.properties"
  echo "$KAFKA_PORT" >"$KDIR/port"
  cluster_id="$("${JAVA[@]}" -cp "$KLIB/*" kafka.tools.StorageTool random-uuid)"
  # static quorum (controller.quorum.voters): format without --standalone
  "${JAVA[@]}" -cp "$KLIB/*" -Dlog4j2.configurationFile="$ROOT/deploy/kafka/log4j2.yaml" -Dkafka.logs.dir="$KDIR" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$KDIR/server.properties" "${scram[@]}" >"$KDIR/format.out" 2>&1 \
    || { show_logs "$KDIR/format.out"; die "formatting the KRaft storage failed"; }
}

launch_kafka() {  # start the broker on the formatted data in $KDIR; its pid in kafka.pid
  local mode=""
  [ "$SASL" = 1 ] && mode=" (SASL_SSL; SASL_PLAINTEXT on $(($(cat "$KDIR/port") + 2)))"
  log "starting Kafka on 127.0.0.1:$(cat "$KDIR/port")$mode (log: ${KDIR#"$ROOT"/}/server.log)"
  nohup "${JAVA[@]}" -cp "$KLIB/*" -Dlog4j2.configurationFile="$ROOT/deploy/kafka/log4j2.yaml" -Dkafka.logs.dir="$KDIR" \
    kafka.Kafka "$KDIR/server.properties" >>"$KDIR/broker.out" 2>&1 </dev/null 9>&- &
  echo $! >"$KDIR/kafka.pid"
}

# Wait until the broker is ready. Returns 0 when ready, 2 when it exited because a port was taken
# meanwhile (another broker started on the machine at the same time), dies otherwise.
wait_kafka() {
  local pid waited=0 rc why
  pid="$(cat "$KDIR/kafka.pid")"
  until kafka_ready; do
    if ! kafka_pid >/dev/null; then
      rc=0
      wait "$pid" 2>/dev/null || rc=$?
      show_logs "$KDIR/broker.out" "$KDIR/server.log"
      if grep -qsE 'BindException|Address already in use' "$KDIR/server.log" "$KDIR/broker.out"; then
        log "the broker could not bind its ports: another process took one while it started"
        return 2
      fi
      if [ "$rc" -gt 128 ]; then
        why="killed by signal $((rc - 128))$([ "$rc" = 137 ] && echo ' (SIGKILL: out of memory? see dmesg)')"
      else
        why="exit status $rc"
      fi
      [ -s "$KDIR/server.log" ] || [ -s "$KDIR/broker.out" ] || why="$why, and it wrote no log"
      die "the Kafka broker exited during start ($why; logs above)"
    fi
    if [ "$waited" -ge "$START_TIMEOUT" ]; then
      show_logs "$KDIR/broker.out" "$KDIR/server.log"
      die "Kafka did not accept connections and create a topic within ${START_TIMEOUT}s (logs above)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
}

start_kafka() {
  local pid attempt rc
  if pid="$(kafka_pid)"; then
    if [ -n "${RLHF_TEST_KAFKA_PORT:-}" ] && [ "$(cat "$KDIR/port")" != "$RLHF_TEST_KAFKA_PORT" ]; then
      die "Kafka already runs on port $(cat "$KDIR/port") (pid $pid), not $RLHF_TEST_KAFKA_PORT: stop it first"
    fi
    log "Kafka already running (pid $pid, port $(cat "$KDIR/port"))"
    wait_kafka
    return 0
  fi
  command -v java >/dev/null || die "Java 17+ is needed for the Kafka broker (apt-get install openjdk-17-jre-headless)"
  fetch_kafka_jars
  local avoid=""
  for attempt in 1 2 3; do
    pick_kafka_port "$avoid"
    format_kafka
    launch_kafka
    if wait_kafka; then return 0; else rc=$?; fi
    [ "$rc" = 2 ] && [ -z "${RLHF_TEST_KAFKA_PORT:-}" ] || die "the Kafka broker could not bind its ports (logs above)"
    avoid="$KAFKA_PORT"
    log "trying other ports"
  done
  die "the Kafka broker could not bind its ports in 3 attempts (logs above)"
}

restart_kafka() {
  if kafka_pid >/dev/null; then log "Kafka already running"; return 0; fi
  [ -f "$KDIR/server.properties" ] || die "no Kafka data in ${KDIR#"$ROOT"/} to restart on: use start"
  launch_kafka
  wait_kafka || die "the Kafka broker could not bind its ports on restart (logs above)"
}

crash_kafka() {
  local pid
  pid="$(kafka_pid)" || die "Kafka is not running"
  log "killing Kafka with SIGKILL (pid $pid)"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null && grep -qa 'kafka\.Kafka' "/proc/$pid/cmdline" 2>/dev/null; do sleep 0.1; done
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

ensure_pg_bin() {
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
}

PG_PORT="${RLHF_TEST_PG_PORT:-}"
pick_pg_port() {
  local p
  if [ -n "${RLHF_TEST_PG_PORT:-}" ]; then
    port_open "$RLHF_TEST_PG_PORT" && die "$(in_use "$RLHF_TEST_PG_PORT"): set RLHF_TEST_PG_PORT to another port (or unset it)"
    PG_PORT="$RLHF_TEST_PG_PORT"
    return 0
  fi
  for p in $(seq 15432 100 17932); do
    if ! port_open "$p"; then
      [ "$p" = 15432 ] || log "port 15432 is taken: PostgreSQL uses $p"
      PG_PORT="$p"
      return 0
    fi
  done
  die "no free port for PostgreSQL among 15432..17932 (step 100): set RLHF_TEST_PG_PORT"
}

launch_pg() {  # pg_ctl start on $PGDATA with the options saved at initdb
  log "starting PostgreSQL on 127.0.0.1:$(cat "$STATE/pg.port") ($(cat "$STATE/pg.mode")) (log: ${PGRUN#"$ROOT"/}/postgres.log)"
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGRUN/postgres.log" -w -t "$START_TIMEOUT" -o "$(cat "$STATE/pg.opts")" \
    start >&2 9>&- || { show_logs "$PGRUN/postgres.log"; die "PostgreSQL did not start (log above)"; }
}

start_pg() {
  ensure_pg_bin
  if pg_running; then
    if [ -n "${RLHF_TEST_PG_PORT:-}" ] && [ "$(cat "$STATE/pg.port")" != "$RLHF_TEST_PG_PORT" ]; then
      die "PostgreSQL already runs on port $(cat "$STATE/pg.port"), not $RLHF_TEST_PG_PORT: stop it first"
    fi
    log "PostgreSQL already running (port $(cat "$STATE/pg.port"))"
  else
    pick_pg_port
    rm -rf "$PGDATA" "$PGRUN"
    mkdir -p "$PGDATA" "$PGRUN"
    chmod 700 "$PGDATA"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$PGDATA" "$PGRUN"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale >"$STATE/initdb.out" 2>&1 \
      || { show_logs "$STATE/initdb.out"; die "initdb failed"; }
    local opts="-p $PG_PORT -k $PGRUN -c listen_addresses=127.0.0.1"
    if [ "$DURABLE" = 1 ]; then
      echo "durable" >"$STATE/pg.mode"
    else
      # durability off: the data is thrown away after the tests (the fault tests set RLHF_TEST_PG_DURABLE=1)
      opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
      echo "fsync off" >"$STATE/pg.mode"
    fi
    echo "$opts" >"$STATE/pg.opts"
    echo "$PG_PORT" >"$STATE/pg.port"
    launch_pg
  fi
  PG_PORT="$(cat "$STATE/pg.port")"
  if ! as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" | grep -q 1; then
    as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres "$PG_DB" || die "createdb $PG_DB failed"
  fi
}

restart_pg() {
  ensure_pg_bin
  if pg_running; then log "PostgreSQL already running"; return 0; fi
  [ -f "$PGDATA/PG_VERSION" ] && [ -f "$STATE/pg.opts" ] || die "no PostgreSQL data in ${PGDATA#"$ROOT"/} to restart on: use start"
  launch_pg
}

crash_pg() {
  ensure_pg_bin
  pg_running || die "PostgreSQL is not running"
  log "stopping PostgreSQL in immediate mode (a crash: no checkpoint, recovery from the WAL at restart)"
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >&2
}

stop_pg() {
  find_pg_bin || true
  if pg_running; then
    log "stopping PostgreSQL"
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >&2 || true
  fi
  rm -rf "$PGDATA" "$PGRUN" "$STATE/pg.port" "$STATE/pg.opts" "$STATE/pg.mode"
}

write_env() {
  local f="$STATE/env"
  {
    echo "# written by scripts/infra.sh start; source it before running the integration tests"
    if [ -f "$KDIR/port" ]; then
      echo "export RLHF_TEST_KAFKA_BOOTSTRAP=127.0.0.1:$(cat "$KDIR/port")"
      if [ "$SASL" = 1 ]; then
        local ports
        read -r -a ports <<<"$(kafka_ports "$(cat "$KDIR/port")")"
        echo "export RLHF_TEST_KAFKA_SECURITY_PROTOCOL=SASL_SSL"
        echo "export RLHF_TEST_KAFKA_SASL_PLAINTEXT_BOOTSTRAP=127.0.0.1:${ports[2]}"
        echo "export RLHF_TEST_KAFKA_SASL_USERNAME=rlhf"
        echo "export RLHF_TEST_KAFKA_SASL_PASSWORD_FILE=$KDIR/sasl-password"
        echo "export RLHF_TEST_KAFKA_SSL_CA_FILE=$KDIR/tls/ca.pem"
      fi
    fi
    if [ -f "$STATE/pg.port" ]; then
      echo "export RLHF_TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:$(cat "$STATE/pg.port")/$PG_DB"
    fi
  } >"$f"
}

# ----------------------------------------------------------------------------------------- main

# one start/stop at a time per state directory (the servers are started with fd 9 closed, so that
# they do not hold the lock)
mkdir -p "$(dirname "$STATE")"
if command -v flock >/dev/null; then
  exec 9>"$STATE.lock"
  flock 9
fi

what="${2:-all}"
case "$what" in all|kafka|postgres) ;; *) echo "usage: $0 start|restart|crash [kafka|postgres]" >&2; exit 2 ;; esac

case "${1:-}" in
  start)
    mkdir -p "$STATE"
    chmod 755 "$STATE"  # the postgres OS user must reach pg/ and pgrun/ inside
    [ "$what" = postgres ] || start_kafka
    [ "$what" = kafka ] || start_pg
    write_env
    log "ready: source ${STATE#"$ROOT"/}/env"
    ;;
  restart)
    [ "$what" = postgres ] || restart_kafka
    [ "$what" = kafka ] || restart_pg
    ;;
  crash)
    case "$what" in
      kafka) crash_kafka ;;
      postgres) crash_pg ;;
      *) echo "usage: $0 crash kafka|postgres" >&2; exit 2 ;;
    esac
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
    if pg_running; then echo "postgresql: running (127.0.0.1:$(cat "$STATE/pg.port" 2>/dev/null), database $PG_DB, $(cat "$STATE/pg.mode" 2>/dev/null || echo 'fsync off'))"
    else echo "postgresql: stopped"; rc=1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: $0 start|stop|status|restart|crash [kafka|postgres]" >&2
    exit 2
    ;;
esac
