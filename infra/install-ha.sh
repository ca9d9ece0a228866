#!/usr/bin/env bash
# Install Patroni and etcd from Debian's packages when absent: standbys and automatic
# failover of the local cluster ('shardflow cluster up --ha'). shardflow runs them as its
# own processes on loopback; the packages' services are not used (on a systemd host the
# etcd package enables one on 127.0.0.1:2379: 'systemctl disable --now etcd patroni').
set -euo pipefail
if command -v patroni >/dev/null && command -v etcd >/dev/null; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Patroni and etcd from Debian packages..."
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq patroni etcd-server etcd-client >/dev/null
command -v patroni >/dev/null && command -v etcd >/dev/null || {
  echo "patroni/etcd still not found after install" >&2; exit 1; }
# a service the package may have started is not ours
$SUDO systemctl disable --now etcd patroni >/dev/null 2>&1 || true
