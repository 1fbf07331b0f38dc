#!/usr/bin/env bash
# Starts a throwaway PostgreSQL for the tests: a new cluster in a temp dir that listens on
# a Unix socket in that dir only (no TCP port to race for or to expose), run as the
# `postgres` user when we are root (initdb refuses root). Prints its connection string on
# stdout. The server is stopped by its pid, and its directory removed, once the process
# whose pid is the first argument has exited. Exit 3: no PostgreSQL server binaries here
# (`apt-get install postgresql`; .ci/run installs them).
#   Usage: scripts/postgres-for-tests.sh <owner-pid>
set -euo pipefail
owner=${1:?usage: $0 <owner-pid>}

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin): apt-get install postgresql" >&2
  exit 3
fi

dir=$(mktemp -d /tmp/chatvault-pg.XXXXXX)
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
as_owner "$bindir/initdb" -D "$dir/data" -A trust -U postgres --no-locale -E UTF8 --no-sync \
  >"$dir/initdb.log" 2>&1 || {
  cat "$dir/initdb.log" >&2
  exit 1
}
# fsync stays on: the tests' durability claims are about a database that syncs.
as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
  -o "-p 5432 -k $dir -c listen_addresses='' -c max_connections=300" start >/dev/null || {
  cat "$dir/server.log" >&2
  exit 1
}
pid=$(head -1 "$dir/data/postmaster.pid")
# The watcher: once the owner is gone, stop the server by its pid and remove the cluster.
(
  trap '' HUP
  while kill -0 "$owner" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
  kill -QUIT "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -rf "$dir"
) </dev/null >/dev/null 2>&1 &
echo "host=$dir port=5432 user=postgres dbname=postgres"
