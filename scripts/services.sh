#!/usr/bin/env bash
# Starts PostgreSQL, MariaDB and Redis on their standard localhost ports where they are
# installed but stopped. In CI (CI=true) a service that is missing or will not start fails
# the run; elsewhere its tests skip with a line that says why.
set -uo pipefail
fail=0
up() { # name, check command, start command
  local name=$1 check=$2 start=$3
  if eval "$check" >/dev/null 2>&1; then echo "service $name: running"; return; fi
  echo "service $name: starting"
  eval "$start" >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do
    if eval "$check" >/dev/null 2>&1; then echo "service $name: running"; return; fi
    sleep 1
  done
  echo "service $name: NOT available"
  fail=1
}
up postgresql "pg_isready -h 127.0.0.1 -p 5432" \
  'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main start'
up mariadb "mariadb -h 127.0.0.1 -P 3306 -uroot -e 'select 1'" \
  'start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd'
up redis "redis-cli -h 127.0.0.1 -p 6379 ping" \
  'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'
if [ "$fail" = 1 ] && [ "${CI:-}" = "true" ]; then
  echo "a required service is not available and CI=true: failing" >&2
  exit 1
fi
exit 0
