#!/usr/bin/env bash
# A local three-node RabbitMQ cluster beside the single broker, for the
# node-loss test (tests/it/cluster.rs) and the bench's node-loss phase:
#   herald-1@localhost  AMQP 127.0.0.1:5681  management 127.0.0.1:15681
#   herald-2@localhost  AMQP 127.0.0.1:5682  management 127.0.0.1:15682
#   herald-3@localhost  AMQP 127.0.0.1:5683  management 127.0.0.1:15683
# One host, one Erlang cookie (the rabbitmq user's), data under
# /var/lib/rabbitmq/herald-cluster, logs under /var/log/rabbitmq/herald-cluster.
# Quorum queues declared there get a member on each of the three nodes.
#
#   cluster.sh up        start the nodes that are stopped, join them, wait (idempotent)
#   cluster.sh stop N    stop node N cleanly (rabbitmqctl stop)
#   cluster.sh kill N    kill node N's Erlang VM with SIGKILL (a crash)
#   cluster.sh pid N     print the process id of node N's Erlang VM
#   cluster.sh urls      print the three AMQP URLs, comma-separated (herald's amqp_url)
#
# `scripts/services.sh --cluster` runs `up` after the other services.
set -euo pipefail

CONF=/etc/rabbitmq/herald-cluster
DATA=/var/lib/rabbitmq/herald-cluster
LOGS=/var/log/rabbitmq/herald-cluster
NODES=(1 2 3)
MAX_MESSAGE_SIZE=16777216 # as the single broker (scripts/services.sh)

say() { printf 'cluster: %s\n' "$*"; }
die() { printf 'cluster: ERROR: %s\n' "$*" >&2; exit 1; }

node() { echo "herald-$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
ctl() { local n=$1; shift; rabbitmqctl -q -n "$(node "$n")" "$@"; }
# The node's Erlang VM answers (its rabbit app may be paused: pause_minority).
running() { ctl "$1" eval 'ok.' >/dev/null 2>&1; }

configure() {
  command -v rabbitmq-server >/dev/null 2>&1 || die "rabbitmq-server is not installed (run scripts/services.sh first)"
  mkdir -p "$CONF" "$DATA" "$LOGS"
  chown rabbitmq:rabbitmq "$DATA" "$LOGS"
  # Not /etc/rabbitmq/rabbitmq-env.conf: it names the single broker's node.
  cat >"$CONF/env.conf" <<CONF
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
  for n in "${NODES[@]}"; do
    cat >"$CONF/herald-$n.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
management.tcp.ip = 127.0.0.1
management.tcp.port = $((15680 + n))
max_message_size = $MAX_MESSAGE_SIZE
cluster_partition_handling = pause_minority
CONF
  done
}

start() { # n
  local n=$1
  say "starting $(node "$n") (AMQP 127.0.0.1:$(amqp_port "$n"))"
  env RABBITMQ_NODENAME="$(node "$n")" \
    RABBITMQ_CONF_ENV_FILE="$CONF/env.conf" \
    RABBITMQ_CONFIG_FILE="$CONF/herald-$n.conf" \
    RABBITMQ_MNESIA_BASE="$DATA" \
    RABBITMQ_LOG_BASE="$LOGS" \
    RABBITMQ_PID_FILE="$DATA/herald-$n.pid" \
    RABBITMQ_DIST_PORT="$((25680 + n))" \
    rabbitmq-server -detached >/dev/null 2>&1 || true
}

up() {
  configure
  for n in "${NODES[@]}"; do
    running "$n" || start "$n"
  done
  for n in "${NODES[@]}"; do
    ctl "$n" await_startup --timeout 90 >/dev/null 2>&1 \
      || die "$(node "$n") did not start within 90 s (log: $LOGS/$(node "$n").log)"
  done
  for n in "${NODES[@]:1}"; do
    if ! ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"disk_nodes\":\[[^]]*\"$(node "$n")\""; then
      say "joining $(node "$n") to $(node 1)"
      {
        ctl "$n" stop_app && ctl "$n" reset && ctl "$n" join_cluster "$(node 1)" && ctl "$n" start_app
      } >>"$LOGS/join.log" 2>&1 || die "$(node "$n") could not join $(node 1) (log: $LOGS/join.log)"
    fi
  done
  local members
  members=$(ctl 1 cluster_status --formatter json 2>/dev/null | grep -o '"running_nodes":\[[^]]*\]' || true)
  for n in "${NODES[@]}"; do
    [[ "$members" == *"\"$(node "$n")\""* ]] || die "$(node "$n") is not running in the cluster: $members"
  done
  say "three nodes running: $(urls)"
}

urls() {
  local list=()
  for n in "${NODES[@]}"; do list+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
  (IFS=,; echo "${list[*]}")
}

case "${1:-}" in
  up) up ;;
  stop) ctl "${2:?node number}" stop >/dev/null 2>&1 || die "could not stop $(node "$2")" ;;
  kill)
    pid=$(ctl "${2:?node number}" eval 'list_to_integer(os:getpid()).' 2>/dev/null) || die "$(node "$2") is not running"
    kill -KILL "$pid"
    # epmd forgets the node once its VM is gone; wait so that `up` restarts it.
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.1; done
    die "$(node "$2") (pid $pid) still runs"
    ;;
  pid) ctl "${2:?node number}" eval 'list_to_integer(os:getpid()).' 2>/dev/null || die "$(node "$2") is not running" ;;
  urls) urls ;;
  *) die "usage: cluster.sh up | stop N | kill N | pid N | urls" ;;
esac
