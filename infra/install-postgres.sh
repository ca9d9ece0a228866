#!/usr/bin/env bash
# Install the PostgreSQL server (15+) from Debian's packages when it is absent.
# shardflow starts its own servers (as the postgres OS user); the distribution's default
# cluster is not used and not started.
set -euo pipefail
have_server() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && return 0
  done
  return 1
}
if have_server; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing PostgreSQL server from Debian packages..."
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# postgresql-common would create and start a default cluster on 5432: we do not want it
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/shardflow.conf >/dev/null
$SUDO apt-get install -y -qq postgresql postgresql-contrib >/dev/null
have_server || { echo "PostgreSQL server binaries still not found after install" >&2; exit 1; }
