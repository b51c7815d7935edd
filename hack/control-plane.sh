#!/usr/bin/env bash
# Builds (once) and caches the real test cluster's Kubernetes binaries: kube-apiserver,
# kube-controller-manager and kube-scheduler (the control plane), kubelet and kube-proxy (the nodes),
# v1.20.2 from Debian 12's kubernetes source package, built with Go 1.15 as Kubernetes 1.20 builds
# itself, plus etcd from Debian 12's etcd-server. Prints the folder that holds the binaries.
#
# Nothing is installed system-wide except rsync (Kubernetes' build needs it): the Debian archives
# are read through a private apt configuration under the cache folder.
set -euo pipefail

cache=${KVPN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpn}
bin=$cache/control-plane/bin
kube=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
want=("${kube[@]}" etcd)

have_all() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if have_all; then echo "$bin"; exit 0; fi

log() { echo "control-plane: $*" >&2; }
work=$cache/control-plane/work
goroot=$work/go115/usr/lib/go-1.15
tree=$work/gopath/src/k8s.io/kubernetes
missing=()
for b in "${kube[@]}"; do [ -x "$bin/$b" ] || missing+=("$b"); done
# The steps this run takes: what is cached is neither done nor counted.
steps=1
command -v rsync >/dev/null || steps=$((steps + 1))
[ -x "$bin/etcd" ] || steps=$((steps + 1))
if [ ${#missing[@]} -gt 0 ]; then
  steps=$((steps + 1))
  [ -x "$goroot/bin/go" ] || steps=$((steps + 1))
  [ -f "$tree/Makefile" ] || steps=$((steps + 1))
fi
# shellcheck source=hack/progress.sh
. "$(dirname "${BASH_SOURCE[0]}")/progress.sh"
apt_dir=$cache/control-plane/apt
mkdir -p "$bin" "$work" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"

# Reuse the archive address and keyring the machine already trusts for bookworm.
sources=/etc/apt/sources.list.d/debian.sources
uri=$(awk '/^URIs:/ {print $2; exit}' "$sources")
keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$sources")
[ -n "$uri" ] && [ -n "$keyring" ] || { log "cannot read the Debian archive from $sources"; exit 1; }
cat >"$apt_dir/sources.list" <<LIST
deb [signed-by=$keyring] $uri bookworm main
deb-src [signed-by=$keyring] $uri bookworm main
deb [signed-by=$keyring] $uri bullseye main
LIST
papt() {
  apt-get -q -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
    -o APT::Sandbox::User=root "$@"
}

command -v rsync >/dev/null || { step "installing rsync (Kubernetes' build needs it)"; apt-get -q update >&2; apt-get -q install -y rsync >&2; }
command -v make >/dev/null || { log "make is missing"; exit 1; }

step "reading the Debian package lists (a few seconds)"
papt update >&2

if [ ! -x "$bin/etcd" ]; then
  step "fetching etcd from Debian 12 (about 8 MB)"
  (cd "$work" && papt download etcd-server/bookworm >&2)
  rm -rf "$work/etcd" && dpkg-deb -x "$work"/etcd-server_*.deb "$work/etcd"
  cp "$work/etcd/usr/bin/etcd" "$bin/etcd"
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ ! -x "$goroot/bin/go" ]; then
    step "fetching Go 1.15 from Debian 11 (about 60 MB)"
    (cd "$work" && papt download golang-1.15-go/bullseye golang-1.15-src/bullseye >&2)
    rm -rf "$work/go115"
    for deb in "$work"/golang-1.15-*.deb; do dpkg-deb -x "$deb" "$work/go115"; done
  fi
  if [ ! -f "$tree/Makefile" ]; then
    step "fetching Debian 12's kubernetes source package (about 35 MB)"
    mkdir -p "$work/src" && (cd "$work/src" && papt source --download-only kubernetes/bookworm >&2)
    orig=$(ls "$work"/src/kubernetes_*.orig.tar.* | head -n 1)
    rm -rf "$work/gopath" && mkdir -p "$tree"
    tar -xf "$orig" -C "$tree" --strip-components=1
  fi
  step "building ${missing[*]} (about 7 minutes on 2 cores for all five; cached after)"
  build() (
    cd "$tree"
    export GOROOT=$goroot GOPATH=$work/gopath GO111MODULE=off CGO_ENABLED=0
    export GOCACHE=$work/gocache PATH=$goroot/bin:$PATH
    make WHAT="${missing[*]/#/cmd/}" >&2
  )
  ticking "building ${missing[*]}" build
  for b in "${missing[@]}"; do cp "$tree/_output/bin/$b" "$bin/"; done
fi

have_all || { log "build finished without all binaries"; exit 1; }
echo "$bin"
