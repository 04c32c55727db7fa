#!/usr/bin/env bash
# Two (or more) "hosts" on one Linux machine, for multi-host launches over TCP (needs root).
#
#   rig.sh up [N]          N (default 2) hosts node1..nodeN: each its own network namespace
#                          (one bridge joins them, 10.77.0.K/24), host name and /etc/hosts
#   rig.sh exec HOST CMD   run CMD "on" HOST: in its network namespace, with its host name,
#                          and its own private folder at $MT_RIG_PRIVATE (a tmpfs: what one
#                          host writes there the others do not see, like /tmp on real hosts)
#   rig.sh rsh [-opts] HOST CMD...   what a launcher calls instead of ssh (hydra's
#                          -launcher-exec, Open MPI's plm_ssh_agent): CMD through a shell on
#                          HOST, with a login environment (nothing inherited, as over ssh)
#   rig.sh down            remove the namespaces, the bridge and the hosts files
#
# Env: MT_RIG (prefix of the namespace and link names, default "mt"), MT_RIG_PRIVATE (default
# /tmp/$MT_RIG-private).  The file system is shared by all hosts, as on a cluster whose home
# and venv live on a network file system; only MT_RIG_PRIVATE differs per host.
set -euo pipefail
RIG=${MT_RIG:-mt}
PRIVATE=${MT_RIG_PRIVATE:-/tmp/$RIG-private}
BRIDGE=$RIG-br
SUBNET=10.77.0
SELF=$(readlink -f "$0")

hosts() { ls /run/netns 2>/dev/null | sed -n "s/^$RIG-//p" | sort; }

up() {
  local n=${1:-2} i
  down
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$n"); do
    ip netns add "$RIG-node$i"
    ip link add "$RIG-v$i" type veth peer name eth0 netns "$RIG-node$i"
    ip link set "$RIG-v$i" master "$BRIDGE" up
    ip -n "$RIG-node$i" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$RIG-node$i" link set eth0 up
    ip -n "$RIG-node$i" link set lo up
  done
  for i in $(seq 1 "$n"); do  # `ip netns exec` mounts /etc/netns/NS/hosts on /etc/hosts
    mkdir -p "/etc/netns/$RIG-node$i"
    { echo "127.0.0.1 localhost"; for k in $(seq 1 "$n"); do echo "$SUBNET.$k node$k"; done; } \
      >"/etc/netns/$RIG-node$i/hosts"
  done
  mkdir -p "$PRIVATE"
}

on_host() {
  local host=$1; shift
  [ -e "/run/netns/$RIG-$host" ] || { echo "rig: no host $host (hosts: $(hosts | tr '\n' ' '))" >&2; exit 255; }
  exec ip netns exec "$RIG-$host" unshare --uts --ipc --mount --propagation private \
    sh -c 'hostname "$0"; mount -t tmpfs -o size=256m tmpfs "$1"
           mount -t tmpfs -o size=1g tmpfs /dev/shm; shift; exec "$@"' \
    "$host" "$PRIVATE" "$@"
}

rsh() {
  while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # ssh options (-x, -q ...)
  local host=$1; shift
  exec env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="${HOME:-/root}" \
    MT_RIG="$RIG" MT_RIG_PRIVATE="$PRIVATE" "$SELF" exec "$host" sh -c "$*"
}

down() {
  local h
  for h in $(hosts); do ip netns del "$RIG-$h"; rm -rf "/etc/netns/$RIG-$h"; done
  ip link del "$BRIDGE" 2>/dev/null || true
}

case "${1:-}" in
  up) shift; up "$@" ;;
  exec) shift; on_host "$@" ;;
  rsh) shift; rsh "$@" ;;
  down) down ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
