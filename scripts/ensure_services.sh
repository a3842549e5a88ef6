#!/usr/bin/env bash
# Make sure the local Postgres and Redis that the tests use are up, starting
# them if they are installed and stopped. Fails loudly if one cannot be had.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_PORT=6379

wait_for() {  # wait_for <what> <command...>
  local what=$1; shift
  for _ in $(seq 1 30); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "error: $what did not come up" >&2
  return 1
}

if ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "Starting PostgreSQL..."
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  else
    echo "error: PostgreSQL is not running on $PG_HOST:$PG_PORT and is not installed here." >&2
    exit 1
  fi
  wait_for PostgreSQL pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
fi

if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  if command -v redis-server >/dev/null; then
    echo "Starting Redis..."
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
  else
    echo "error: Redis is not running on 127.0.0.1:$REDIS_PORT and is not installed here." >&2
    exit 1
  fi
  wait_for Redis sh -c "redis-cli -h 127.0.0.1 -p $REDIS_PORT ping | grep -q PONG"
fi
echo "PostgreSQL and Redis are up."
