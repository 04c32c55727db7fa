#!/usr/bin/env bash
# Several containers as MPI hosts on one machine: a private container network, N containers
# of an image built with WITH_SSH=1, passwordless ssh between them, /etc/hosts entries and a
# hostfile.  Then `run` launches mpiexec in the first container across all of them.
#
#   docker/multihost.sh up [N] [IMAGE]     start N (default 2) hosts node1..nodeN
#   docker/multihost.sh run ARGS...        mpiexec ARGS... on node1 with the hostfile /hosts
#                                          e.g. run -n 4 python -m mpitrain run jobs/digits.toml
#   docker/multihost.sh down               remove the containers, the network and the key
# Env: ENGINE (podman), MT_NET (mpitrain-net), MT_SLOTS (ranks per host, 2),
#      MT_OUT (host folder mounted at /out in every container; default none).
# The MPI flavour is read from the image: MPICH uses `-f /hosts` (node:slots lines), Open MPI
# `--hostfile /hosts` (node slots=K lines) plus tcp in OMPI_MCA_btl.
set -euo pipefail
ENGINE=${ENGINE:-podman}
NET=${MT_NET:-mpitrain-net}
SLOTS=${MT_SLOTS:-2}
STATE=${TMPDIR:-/tmp}/mpitrain-multihost-$NET
RUN_OPTS=(--ulimit nofile=4096:4096 --ulimit nproc=8192:8192)

up() {
  local n=${1:-2} image=${2:-localhost/mpitrain:ssh} i h ip vol=()
  mkdir -p "$STATE"; : >"$STATE/hosts"; : >"$STATE/hostnames"
  [ -n "${MT_OUT:-}" ] && { mkdir -p "$MT_OUT"; vol=(-v "$MT_OUT:/out"); }
  "$ENGINE" network exists "$NET" 2>/dev/null || "$ENGINE" network create "$NET" >/dev/null
  [ -s "$STATE/key" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/key"
  for i in $(seq 1 "$n"); do
    h=node$i
    "$ENGINE" run -d "${RUN_OPTS[@]}" "${vol[@]}" --name "$NET-$h" --hostname "$h" \
      --network "$NET" "$image" sleep infinity >/dev/null
    ip=$("$ENGINE" inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$NET-$h")
    echo "$ip $h" >>"$STATE/hosts"; echo "$h" >>"$STATE/hostnames"
  done
  local flavour; flavour=$("$ENGINE" exec "$NET-node1" mpiexec --version 2>&1 | head -3)
  while read -r h; do
    "$ENGINE" cp "$STATE/key" "$NET-$h:/root/.ssh/id_ed25519"
    "$ENGINE" cp "$STATE/key.pub" "$NET-$h:/root/.ssh/authorized_keys"
    # Name resolution does not depend on the network backend's DNS plugin.
    "$ENGINE" exec -i "$NET-$h" sh -c 'cat >> /etc/hosts' <"$STATE/hosts"
    "$ENGINE" exec "$NET-$h" sh -c 'chmod 600 /root/.ssh/*; /usr/sbin/sshd'
    if echo "$flavour" | grep -q "Open MPI"; then
      echo "$h slots=$SLOTS"; else echo "$h:$SLOTS"; fi
  done <"$STATE/hostnames" >"$STATE/hostfile"
  "$ENGINE" cp "$STATE/hostfile" "$NET-node1:/hosts"
  echo "multihost: $n hosts up on network $NET: $(tr '\n' ' ' <"$STATE/hostnames")" >&2
}

run() {
  if "$ENGINE" exec "$NET-node1" mpiexec --version 2>&1 | grep -q "Open MPI"; then
    exec "$ENGINE" exec -e OMPI_MCA_btl=self,sm,tcp "$NET-node1" mpiexec --hostfile /hosts "$@"
  fi
  exec "$ENGINE" exec "$NET-node1" mpiexec -f /hosts "$@"
}

down() {
  local h
  if [ -s "$STATE/hostnames" ]; then
    while read -r h; do "$ENGINE" rm -f -t 0 "$NET-$h" >/dev/null 2>&1 || true; done <"$STATE/hostnames"
  fi
  "$ENGINE" network rm "$NET" >/dev/null 2>&1 || true
  rm -rf "$STATE"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  run) shift; run "$@" ;;
  down) down ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
