#!/usr/bin/env bash
# Make the local services herald needs available, idempotently:
#   RabbitMQ   on 127.0.0.1:5672 (guest/guest)
#   SecantusDB (MongoDB wire protocol) on 127.0.0.1:27017, data under .services/
# Installs what is missing, starts what is stopped, waits until each answers.
# Used by `make services`, `make test`, `make demo`, `make bench` and CI.
#   --cluster  also a three-node RabbitMQ cluster on 127.0.0.1:5681-5683
#              (scripts/cluster.sh), for the node-loss test and the bench
#   --bench    also the bench's tools (wrk)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.services"
SECANTUS_VERSION="0.5.3-beta.196"   # pinned: see DEVELOPERS.md
MONGO_PORT="${HERALD_SERVICES_MONGO_PORT:-27017}"
mkdir -p "$STATE"

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds logfile
  local name=$1 port=$2 secs=$3 log=$4
  for _ in $(seq 1 "$((secs * 2))"); do
    port_open "$port" && { say "$name answers on 127.0.0.1:$port"; return 0; }
    sleep 0.5
  done
  [ -f "$log" ] && tail -n 20 "$log" >&2
  die "$name did not answer on 127.0.0.1:$port within ${secs}s (log: $log)"
}

apt_install() {
  if [ -z "${HERALD_APT_UPDATED:-}" ]; then
    apt-get update -qq >/dev/null || die "apt-get update failed"
    export HERALD_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

# --- RabbitMQ ---------------------------------------------------------------
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  say "installing rabbitmq-server"
  apt_install rabbitmq-server
fi
# A TLS listener on 127.0.0.1:5671 beside the plain one, for the TLS tests
# (tests/it/tls.rs): a CA, a server certificate for localhost and a client
# certificate, made once, in a fixed place the broker reads (the tests read
# the CA and the client's pair from there too). The listener requires a
# client certificate signed by that CA.
TLS_DIR=/etc/rabbitmq/herald-test-tls
if [ ! -f "$TLS_DIR/client.key" ]; then
  say "making the test CA and certificates in $TLS_DIR"
  mkdir -p "$TLS_DIR"
  (
    cd "$TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650 -subj "/CN=herald test CA" 2>/dev/null
    for who in server client; do
      openssl req -newkey rsa:2048 -nodes -keyout "$who.key" -out "$who.csr" -subj "/CN=$who" 2>/dev/null
      printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$who.pem" -days 3650 -extfile "$who.ext" 2>/dev/null
    done
    chmod 644 ./*.pem ./*.key
  ) || die "could not make the test certificates"
fi
CONF=/etc/rabbitmq/rabbitmq.conf
if ! grep -q '^listeners.ssl.default' "$CONF" 2>/dev/null; then
  say "adding the TLS listener (127.0.0.1:5671) to $CONF"
  cat >>"$CONF" <<CONF
listeners.ssl.default = 127.0.0.1:5671
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
  if rabbitmqctl -q status >/dev/null 2>&1; then
    say "restarting RabbitMQ for its TLS listener"
    rabbitmqctl -q stop >/dev/null 2>&1 || true
  fi
fi
# The largest message the broker accepts: RabbitMQ 4.x's default, which is
# also herald's `worker.broker_max_message_bytes` default (3.x's is 128 MiB).
# `herald doctor` probes it; the bench raises it for its oversized phase.
MAX_MESSAGE_SIZE=16777216
if ! grep -q '^max_message_size' "$CONF" 2>/dev/null; then
  say "setting max_message_size = $MAX_MESSAGE_SIZE in $CONF"
  echo "max_message_size = $MAX_MESSAGE_SIZE" >>"$CONF"
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  say "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
for _ in $(seq 1 120); do
  rabbitmqctl -q await_startup >/dev/null 2>&1 && break
  sleep 0.5
done
wait_port RabbitMQ 5672 60 /var/log/rabbitmq/rabbit@localhost.log
# A run stopped mid-way (the bench's oversized phase) may have left the limit
# raised in the running broker: put it back.
rabbitmqctl -q eval "application:set_env(rabbit, max_message_size, $MAX_MESSAGE_SIZE)." >/dev/null \
  || die "could not set RabbitMQ's max_message_size"
wait_port "RabbitMQ TLS" 5671 60 /var/log/rabbitmq/rabbit@localhost.log
# The management API: `herald doctor --management-url` reads the broker's
# version and policies through it (KEDA uses it too).
if ! port_open 15672; then
  say "enabling the RabbitMQ management plugin"
  rabbitmq-plugins -q enable rabbitmq_management >/dev/null 2>&1 || die "rabbitmq-plugins enable rabbitmq_management failed"
fi
wait_port "RabbitMQ management" 15672 60 /var/log/rabbitmq/rabbit@localhost.log

# --- SecantusDB -------------------------------------------------------------
if ! command -v secantusd-rs >/dev/null 2>&1 \
   || ! secantusd-rs --version 2>/dev/null | grep -q "$SECANTUS_VERSION"; then
  command -v cmake >/dev/null 2>&1 || { say "installing cmake"; apt_install cmake; }
  say "installing secantus-mdb $SECANTUS_VERSION (a few minutes, once)"
  cargo install secantus-mdb --version "$SECANTUS_VERSION" --locked --ignore-rust-version \
    >"$STATE/secantus-install.log" 2>&1 || { tail -n 30 "$STATE/secantus-install.log" >&2; die "cargo install secantus-mdb failed"; }
fi
if ! port_open "$MONGO_PORT"; then
  say "starting secantusd-rs (data in $STATE/mongo)"
  mkdir -p "$STATE/mongo"
  setsid nohup secantusd-rs --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$STATE/mongo" \
    --cache-size 256M --log-file-max 16MB >"$STATE/secantusd.log" 2>&1 &
  echo $! >"$STATE/secantusd.pid"
fi
wait_port SecantusDB "$MONGO_PORT" 60 "$STATE/secantusd.log"

# --- test tools ---------------------------------------------------------------
# libfaketime: tests run worker processes whose wall clocks are off by ±30 s.
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ]; then
  say "installing faketime"
  apt_install faketime
fi

# --- optional ---------------------------------------------------------------
for option in "$@"; do
  case "$option" in
    --bench)
      if ! command -v wrk >/dev/null 2>&1; then
        say "installing wrk"
        apt_install wrk
      fi
      ;;
    --cluster) bash "$ROOT/scripts/cluster.sh" up ;;
    *) die "unknown option $option (--bench, --cluster)" ;;
  esac
done
say "ready"
