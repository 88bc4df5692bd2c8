#!/bin/sh
# The processes of the Meterai image (deploy/README.md), one per container:
#
#   meterai-entrypoint PROCESS [EXTRA ARGUMENTS...]
#
# Extra arguments go to the process (a later `--port` wins). Each `exec`s, so the process is
# PID 1 and receives SIGTERM itself (services.platform.serve stops cleanly on it).
set -eu

serve() {
    factory="$1"
    port="$2"
    shift 2
    exec python -m services.platform.serve "$factory" --host 0.0.0.0 --port "$port" "$@"
}

process="${1:-}"
if [ "$#" -gt 0 ]; then
    shift
fi

case "$process" in
    gateway) serve services.gateway.app:create_app 8000 "$@" ;;
    queue) serve services.queue.app:create_app 8001 "$@" ;;
    inventory) serve services.inventory.app:create_app 8002 "$@" ;;
    stamping) serve services.stamping.app:create_app 8003 "$@" ;;
    # Open HTTP connections get 5 s; jobs in flight get METERAI_STAMPING_WORKER_GRACE_SECONDS.
    signing-worker) serve services.stamping.worker:create_worker_app 8010 --graceful-seconds 5 "$@" ;;
    migrate) exec meterai migrate "$@" ;;
    # Any other command line: `meterai distributor create ...`, `meterai keys init ...`.
    meterai) exec meterai "$@" ;;
    # Container health checks (docker compose): exits non-zero unless URL answers 2xx.
    probe)
        exec python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)' "$@"
        ;;
    *)
        echo "usage: meterai-entrypoint gateway|queue|inventory|stamping|signing-worker|migrate|meterai ARGS|probe URL" >&2
        exit 64
        ;;
esac
