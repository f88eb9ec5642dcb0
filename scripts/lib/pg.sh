# Private, throwaway PostgreSQL clusters for tests, demo and benchmarks.
# Sourced by scripts/test, scripts/demo and scripts/bench.
#
# initdb refuses to run as root, and these machines run as root, so clusters
# run as the unprivileged `postgres` system user when we are root. Each
# cluster listens on 127.0.0.1 on a free port with trust authentication: it
# is private to this build and deleted afterwards.

PG_BIN=""

pg_log() { printf '[pg] %s\n' "$*" >&2; }

# Installs PostgreSQL with apt-get if no server binaries are present.
pg_ensure_installed() {
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    pg_log "PostgreSQL server not found; installing with apt-get"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql postgresql-contrib >/dev/null
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
  fi
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
}

# Runs a command as the cluster owner.
pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# pg_start_cluster DIR [extra postgresql.conf lines...]
# Creates and starts a cluster in DIR; prints its port on stdout.
pg_start_cluster() {
  local dir=$1; shift
  pg_ensure_installed
  mkdir -p "$dir"
  # The owner must be able to reach the folder; fall back to /tmp if a parent
  # (a home directory, say) is closed to it.
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$dir"
    if ! runuser -u postgres -- test -w "$dir"; then
      rmdir "$dir" 2>/dev/null || true
      dir=$(mktemp -d /tmp/ctmirror-pg.XXXXXX)
      chown postgres: "$dir"
      pg_log "build folder not reachable by user postgres; using $dir"
    fi
  fi
  pg_as_owner "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || pg_as_owner "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir'"
    echo "max_connections = 300"
    echo "shared_buffers = 128MB"
    for line in "$@"; do echo "$line"; done
  } | pg_as_owner tee -a "$dir/data/postgresql.conf" >/dev/null
  local attempt port
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    port=$(( 20000 + (RANDOM * 7 + $$ + attempt * 131) % 30000 ))
    pg_port_free "$port" || continue
    if pg_as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -o "-p $port" -l "$dir/server.log" -w -t 60 start >/dev/null 2>&1; then
      echo "$dir" > "$dir/.dir"
      echo "$port"
      return 0
    fi
  done
  pg_log "could not start PostgreSQL in $dir; see $dir/server.log"
  tail -n 20 "$dir/server.log" >&2 || true
  return 1
}

# pg_stop_cluster DIR: stops and deletes a cluster started by pg_start_cluster.
pg_stop_cluster() {
  local dir=$1
  [ -d "$dir/data" ] || return 0
  pg_as_owner "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

# Settings that make a throwaway test cluster fast; never use for benchmarks
# that claim durability.
PG_FAST_SETTINGS=("fsync = off" "synchronous_commit = off" "full_page_writes = off")
