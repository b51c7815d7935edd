#!/usr/bin/env bash
# One Kubernetes node of the test cluster (harness/cluster.py): containerd, kubelet and
# kube-proxy together in the node's network namespace and in a mount namespace of their own.
#
# Started as: nsenter --net=/run/netns/NODE unshare --mount --propagation slave node.sh NODE_DIR BIN_DIR
# (one mount namespace for all three: kubelet's secret and volume mounts must be visible to containerd).
# Host mounts still reach the node (slave); nothing mounted here reaches the host. Everything the node
# writes goes under NODE_DIR: its /run, /var/lib and /var/log are folders of it, so two nodes never share
# a socket, a state folder or the pod log folder that each kubelet's garbage collector prunes.
set -euo pipefail

node_dir=$1
bin=$2
log() { echo "node.sh: $*" >&2; }

# The sysfs mounted for the host shows the host's network devices; kubelet and the CNI plugins read the
# node's own. A fresh sysfs shows this namespace's; the cgroup mounts under it are moved aside and back.
aside=$node_dir/cgroup-aside
mkdir -p "$aside"
mount --move /sys/fs/cgroup "$aside"
mount -t sysfs sysfs /sys
mount --move "$aside" /sys/fs/cgroup

# kubelet 1.20 refuses to start unless these host-wide settings have the values it wants, and writes
# them itself otherwise: a file of our own over each entry takes both, and the host keeps its values.
while read -r key value; do
  file=$node_dir/sysctl/${key//\//.}
  mkdir -p "$node_dir/sysctl"
  echo "$value" >"$file"
  mount --bind "$file" "/proc/sys/$key"
done <<'SYSCTLS'
vm/overcommit_memory 1
vm/panic_on_oom 0
kernel/panic 10
kernel/panic_on_oops 1
kernel/keys/root_maxkeys 1000000
kernel/keys/root_maxbytes 25000000
SYSCTLS

for dir in run var-lib var-log; do mkdir -p "$node_dir/$dir"; done
mount --bind "$node_dir/run" /run
mount --bind "$node_dir/var-lib" /var/lib
mount --bind "$node_dir/var-log" /var/log
mount --bind "$node_dir/etc-resolv.conf" /etc/resolv.conf
mkdir -p /run/netns /var/lib/kubelet /var/log/pods /var/log/containers

# Per-namespace network settings a node needs: routing for pods, and bridged pod traffic through
# iptables so that kube-proxy's rules see Service traffic between pods on the same bridge.
sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.forwarding=1 net.bridge.bridge-nf-call-iptables=1 \
  net.bridge.bridge-nf-call-ip6tables=1 net.ipv6.conf.all.forwarding=1

pids=()
stop() {
  trap - TERM INT EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop TERM INT EXIT

containerd --config "$node_dir/containerd.toml" >>"$node_dir/containerd.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do
  [ -S /run/containerd/containerd.sock ] && break
  sleep 0.05
done
[ -S /run/containerd/containerd.sock ] || { log "containerd did not open its socket"; exit 1; }
: >"$node_dir/containerd.ready"

"$bin/kubelet" --config="$node_dir/kubelet.yaml" --kubeconfig="$node_dir/kubelet.kubeconfig" \
  --container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
  --root-dir=/var/lib/kubelet --cert-dir="$node_dir/pki" --hostname-override="$(cat "$node_dir/name")" \
  --node-ip="$(cat "$node_dir/address")" >>"$node_dir/kubelet.log" 2>&1 &
pids+=($!)

"$bin/kube-proxy" --config="$node_dir/kube-proxy.yaml" >>"$node_dir/kube-proxy.log" 2>&1 &
pids+=($!)

# Any of the three exiting ends the node: the harness sees this script exit and reports its logs.
set +e
wait -n
status=$?
log "a node process exited with $status"
exit "$status"
