#!/usr/bin/env bash
# Starts a throw-away PostgreSQL server for the test suite (Debian's `postgresql` package must be installed).
#   source scripts/test_postgres.sh   # exports BUTD_TEST_POSTGRES_URL and stops the server when the shell exits
# Runs as the `postgres` user when started as root (initdb refuses root). Without PostgreSQL it says so and returns
# non-zero; the tests that need it then skip with that reason.
butd_pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$butd_pg_bin" ] || [ ! -x "$butd_pg_bin/initdb" ]; then
  echo "test_postgres: no PostgreSQL server under /usr/lib/postgresql (apt-get install postgresql)" >&2
  return 1 2>/dev/null || exit 1
fi
butd_pg_dir=$(mktemp -d /tmp/butd-test-pg.XXXXXX)
butd_pg_as=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$butd_pg_dir"
  butd_pg_as=(runuser -u postgres --)
fi
butd_pg_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# fsync off (-F): a test database need not survive a power cut, and the suite runs faster.
if "${butd_pg_as[@]}" "$butd_pg_bin/initdb" -D "$butd_pg_dir/data" -U postgres --auth=trust -E UTF8 >/dev/null \
   && "${butd_pg_as[@]}" "$butd_pg_bin/pg_ctl" -D "$butd_pg_dir/data" -l "$butd_pg_dir/server.log" -w -t 60 \
        -o "-F -h 127.0.0.1 -p $butd_pg_port -k $butd_pg_dir" start >/dev/null; then
  export BUTD_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$butd_pg_port/postgres"
  trap '"${butd_pg_as[@]}" "$butd_pg_bin/pg_ctl" -D "$butd_pg_dir/data" -m fast stop >/dev/null 2>&1; rm -rf "$butd_pg_dir"' EXIT
  echo "test_postgres: PostgreSQL on 127.0.0.1:$butd_pg_port for this run (BUTD_TEST_POSTGRES_URL)"
else
  echo "test_postgres: could not start PostgreSQL ($butd_pg_dir/server.log); its tests will skip" >&2
  cat "$butd_pg_dir/server.log" >&2 2>/dev/null || true
  rm -rf "$butd_pg_dir"
  return 1 2>/dev/null || exit 1
fi
