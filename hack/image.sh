#!/usr/bin/env bash
# Builds the project's image from its own Dockerfile with buildah (no Docker engine) and exports it as
# an OCI archive that containerd imports. stdout says what it made, one KEY=VALUE a line; logs go to
# stderr:
#
#   archive=/root/.cache/kvpn/image/archives/kvpn-src-0123456789ab.oci.tar
#   image=docker.io/library/kvpn:0.1.0
#   image=docker.io/library/kvpn:src-0123456789ab
#
# A node imports every image= reference in one go:  ctr -n k8s.io images import ARCHIVE
# (-a SOCKET for a node's own containerd). The chart's default repository `kvpn` is
# docker.io/library/kvpn to containerd and its default tag is the chart's appVersion, so
# `helm install --set image.pullPolicy=Never` finds the image. The last image= line names exactly
# this content: src-<hash of the inputs>, or --tag's NAME.
#
#   hack/image.sh              build (or reuse) the image; print its archive and references
#   hack/image.sh --tag NAME   also docker.io/library/kvpn:NAME, for a rolling-update test: the same
#                              layers and a different image ID (one label differs:
#                              dev.kvpn.image.variant=NAME), in an archive of its own holding only
#                              that reference; the lines printed are that archive's
#
# Cache, ${KVPN_CACHE:-~/.cache/kvpn}/image/: buildah's store (store/, run/), the archives
# (archives/) and the stand-in base's debootstrap log (base/); about 450 MB. The image is rebuilt
# only when its inputs change: the Dockerfile, .dockerignore, what .dockerignore lets into the
# build (as the working tree has it: uncommitted edits and new files count), the chart's
# appVersion, this script and the base's image ID. With nothing changed a run only hashes and
# prints (a fraction of a second); with one .py file changed it takes 10-20 s (unchanged steps,
# the apt packages and the dependencies among them, come from the store). Not an input: what pip
# resolves the dependency ranges to on the day, as with any layer cache; `rm -rf
# ~/.cache/kvpn/image` starts afresh. Archives and images of older inputs are removed after each
# build.
#
# The base, KVPN_IMAGE_BASE:
#   standin (default)  localhost/kvpn-base:bookworm, built here once (about a minute) with
#                      `debootstrap --variant=minbase bookworm` from this machine's Debian archive
#                      (read from /etc/apt/sources.list.d/debian.sources, or KVPN_DEBIAN_MIRROR),
#                      plus python3, pip and venv: what the Dockerfile's default base provides, for
#                      machines that reach no container registry. Rebuilt when its recipe changes.
#   pull               `buildah pull` the Dockerfile's default base (once; needs a registry)
#   REFERENCE          that image, pulled once if it is not in the store
#
# pip inside the build uses the host's index settings and CA bundle (pip config, PIP_* variables),
# handed over as build secrets: nothing of them stays in the image or its history.
#
# Needs root, python3, and the Debian packages buildah, runc (only a recommendation of buildah's)
# and debootstrap (for the stand-in base).
# Every buildah step that runs anything uses the host's network (--network host): buildah's default
# network would leave a CNI bridge, iptables chains and ip_forward=1 behind on the host.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
self=$root/hack/image.sh
cache=${KVPN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpn}
dir=$cache/image
archives=$dir/archives
repo=docker.io/library/kvpn
base_mode=${KVPN_IMAGE_BASE:-standin}
standin=localhost/kvpn-base

log() { echo "image.sh: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=hack/progress.sh
. "$root/hack/progress.sh"

variant=
while [ $# -gt 0 ]; do
  case $1 in
    --tag) [ $# -ge 2 ] || die "--tag needs a name"; variant=$2; shift 2 ;;
    --tag=*) variant=${1#--tag=}; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$self"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

app_version=$(awk '/^appVersion:/ {gsub(/["'\'']/, "", $2); print $2; exit}' "$root/helm/kvpn/Chart.yaml")
[ -n "$app_version" ] || die "no appVersion in helm/kvpn/Chart.yaml"
if [ -n "$variant" ]; then
  [[ $variant =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag $variant is not a valid image tag"
  [[ $variant != "$app_version" && $variant != src-* ]] || die "--tag $variant would replace one of the build's own tags"
fi

[ "$(id -u)" = 0 ] || die "needs root (buildah's store and debootstrap): run it with sudo"
command -v buildah >/dev/null || die "buildah is missing: run \`make setup\` (Debian package buildah)"
command -v runc >/dev/null || die "runc is missing: run \`make setup\` (Debian package runc)"

mkdir -p "$archives" "$dir/base"
# One build at a time per cache: runs share the store, and cleanup removes every working container.
exec 9>"$dir/lock"
flock 9

b() { buildah --root "$dir/store" --runroot "$dir/run" --cgroup-manager cgroupfs "$@"; }
# buildah's large temporary files (layer blobs, the build context) stay in the cache, not /var/tmp,
# and its CNI library keeps its lock file here, not in /etc/cni/net.d (no network is ever set up:
# every step that runs something uses the host's). What remains outside the cache is the blob-info
# cache every containers/image tool shares as root, /var/lib/containers/cache.
export TMPDIR=$dir/tmp CONTAINERS_CONF=$dir/containers.conf
printf '[network]\nnetwork_config_dir = "%s"\n' "$dir/cni" >"$CONTAINERS_CONF"

# An interrupted build leaves nothing behind. On SIGINT or SIGTERM buildah removes its own working
# containers; a killed one (SIGKILL, a timeout) leaves them mounted, plus its RUN step's runc
# container (stopped, with its cgroups): the next run removes those, knowing them as ours because
# their bundles lie in this cache. Also: debootstrap's mounts in the root filesystem it was making
# (unmounted before anything there is deleted: debootstrap may bind-mount the host's /dev), the
# store's own private bind mount of its overlay folder, half-written archives.
reap() {
  local id cg m
  if command -v runc >/dev/null; then
    runc list --format json 2>/dev/null | python3 -c '
import json, sys
for c in json.load(sys.stdin) or []:
    if c["bundle"].startswith(sys.argv[1]):
        print(c["id"])
' "$dir/tmp/" | while read -r id; do
      runc delete --force "$id" >/dev/null 2>&1 || true
      for cg in /sys/fs/cgroup/"$id" /sys/fs/cgroup/*/"$id"; do [ ! -d "$cg" ] || rmdir "$cg" 2>/dev/null || true; done
    done
  fi
  if [ -d "$dir/store" ]; then b rm --all >/dev/null 2>&1 || true; fi
  # Deepest first. /proc/mounts escapes a space in a path as \040; the cache's path has none.
  awk -v p="$dir/tmp/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount -l "$m" || true
  done
  if mountpoint -q "$dir/store/overlay"; then umount "$dir/store/overlay" || true; fi
  rm -rf --one-file-system "$dir/tmp" "$archives"/.partial.*
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  reap
  exit "$status"
}
# Only a killed run leaves $dir/tmp behind: the warm path skips runc and buildah.
if [ -e "$dir/tmp" ]; then reap; fi
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$dir/tmp"

# --- the base ------------------------------------------------------------------------------------

sources=/etc/apt/sources.list.d/debian.sources
base_packages="python3 python3-pip python3-venv python-is-python3 ca-certificates netbase tzdata"

# The archive address and keyring the machine already trusts (as hack/control-plane.sh reads them);
# the security archive from its own stanza when there is one.
read_mirror() {
  mirror=${KVPN_DEBIAN_MIRROR:-}
  security=
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ -r "$sources" ]; then
    [ -n "$mirror" ] || mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources")
    security=$(awk '/^URIs:/ {uri = $2} /^Suites:/ && /-security/ {print uri; exit}' "$sources")
    local signed
    signed=$(awk '/^Signed-By:/ {print $2; exit}' "$sources")
    [ -z "$signed" ] || keyring=$signed
  fi
  [ -n "$mirror" ] || die "no Debian archive in $sources: set KVPN_DEBIAN_MIRROR"
  [ -n "$security" ] || security=${mirror%/debian}/debian-security
}

# The stand-in for the Dockerfile's default base (python:3.11-slim-bookworm): Debian bookworm with
# Python 3.11, pip and venv, ca-certificates, netbase and tzdata, and `python` on PATH. Two changes
# make it behave like the official image: no EXTERNALLY-MANAGED marker (there pip installs into the
# system's Python), and apt sources for bookworm, its updates and security, as the official image has.
build_base() {
  local name=$1 ctr rootfs=$dir/tmp/rootfs
  command -v debootstrap >/dev/null || die "debootstrap is missing: run \`make setup\` (Debian package debootstrap)"
  step "the base: building the stand-in $name with debootstrap (about a minute; log: $dir/base/debootstrap.log)"
  quiet_debootstrap() {
    debootstrap --variant=minbase --include="${base_packages// /,}" --keyring="$keyring" \
      bookworm "$rootfs" "$mirror" >"$dir/base/debootstrap.log" 2>&1
  }
  ticking "debootstrap" quiet_debootstrap \
    || { tail -n 20 "$dir/base/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  # The container runtime provides these; debootstrap copied the host's.
  rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf" "$rootfs/etc/hosts"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/var/log/* "$rootfs"/tmp/*
  # Slim, as Debian's -slim images (and so the official python:*-slim) are: no documentation, manual
  # pages or translations, now and for every package installed on top (dpkg's path filters).
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
SLIM
  find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/linda/*
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" --numeric-owner --xattrs --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$dir/tmp/rootfs.tar" .
  rm -rf --one-file-system "$rootfs"
  ctr=$(b from --pull=never scratch)
  b add --quiet "$ctr" "$dir/tmp/rootfs.tar" / >/dev/null
  b config --os linux --arch amd64 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' --created-by "hack/image.sh: debootstrap --variant=minbase bookworm" \
    "$ctr"
  b commit --quiet --rm "$ctr" "$name" >/dev/null
  rm -f "$dir/tmp/rootfs.tar"
}

# Sets base_ref and base_id, making or pulling the base when the store lacks it. The
# stand-in's tag carries a hash of its recipe, so editing the recipe (or the archive address) builds
# a new one, and an unchanged recipe never rebuilds.
ensure_base() {
  local ref
  case $base_mode in
    standin)
      read_mirror
      local recipe
      recipe=$({ declare -f build_base; echo "$base_packages $mirror $security $keyring"; } | sha256sum | cut -c1-12)
      ref=$standin:bookworm-$recipe
      if ! b inspect --type image "$ref" >/dev/null 2>&1; then
        build_base "$ref"
      else
        step "the base: $ref, built before"
      fi
      b tag "$ref" "$standin:bookworm"
      ;;
    pull | */* | *:*)
      ref=$base_mode
      if [ "$ref" = pull ]; then
        ref=$(sed -n 's/^ARG BASE=//p' "$root/Dockerfile" | head -n 1)
        [ -n "$ref" ] || die "no ARG BASE=... default in the Dockerfile"
      fi
      if ! b inspect --type image "$ref" >/dev/null 2>&1; then
        step "the base: pulling $ref"
        ticking "pulling $ref" b pull --quiet "$ref" >/dev/null \
          || die "cannot pull $ref (KVPN_IMAGE_BASE=standin builds a local base instead)"
      else
        step "the base: $ref, pulled before"
      fi
      ;;
    *) die "KVPN_IMAGE_BASE=$base_mode: expected standin, pull or an image reference" ;;
  esac
  base_ref=$ref
  base_id=$(b inspect --type image --format '{{.FromImageID}}' "$ref")
}

# --- pip's settings for the build ----------------------------------------------------------------

# The host's pip index settings and CA bundle as a pip.conf for the build, where they are pip's own
# (`pip config list`, which includes PIP_* variables; the last value of a key wins, as in pip). Local
# things the build cannot see are left out: file:// indexes, find-links folders, constraint files.
pip_secrets=()
prepare_pip() {
  local conf=$dir/tmp/pip.conf cert="" index="" extra="" trusted="" timeout="" key value
  while IFS= read -r line; do
    key=${line%%=*}
    key=${key#*.}
    value=${line#*=}
    value=${value#\'}
    value=${value%\'}
    case $key in
      index-url) index=$value ;;
      extra-index-url) extra=$value ;;
      trusted-host) trusted=$value ;;
      cert) cert=$value ;;
      timeout | default-timeout) timeout=$value ;;
    esac
  done < <(python3 -m pip config list 2>/dev/null || true)
  keep_remote() { local u out=; for u in $1; do case $u in http://* | https://*) out="$out $u" ;; esac; done; echo "${out# }"; }
  index=$(keep_remote "$index")
  extra=$(keep_remote "$extra")
  {
    echo "[global]"
    [ -z "$index" ] || echo "index-url = $index"
    [ -z "$extra" ] || echo "extra-index-url = $extra"
    [ -z "$trusted" ] || echo "trusted-host = $trusted"
    [ -z "$timeout" ] || echo "timeout = $timeout"
    if [ -n "$cert" ] && [ -f "$cert" ]; then echo "cert = /run/secrets/pip-cert"; fi
  } >"$conf"
  pip_secrets=(--secret "id=pip-conf,src=$conf")
  if [ -n "$cert" ] && [ -f "$cert" ]; then pip_secrets+=(--secret "id=pip-cert,src=$cert"); fi
}

# --- inputs, build, export -----------------------------------------------------------------------

# What .dockerignore lets into the build (its `!` lines), minus what it excludes again; the content
# of the working tree, not of a commit, and the executable bit, which COPY keeps.
context_files() {
  local paths
  paths=$(sed -n 's#^!\(.*\)#\1#p' "$root/.dockerignore" | sed 's#/$##')
  (cd "$root" && for p in $paths; do [ -e "$p" ] && find "$p" -type f ! -path '*/__pycache__/*' ! -name '*.pyc'; done) \
    | LC_ALL=C sort
}
input_hash() { # BASE-ID
  (
    cd "$root"
    local files
    files=$(printf '%s\n' Dockerfile .dockerignore hack/image.sh; context_files)
    echo "base $1 appVersion $app_version"
    xargs -d '\n' stat -c '%a %n' <<<"$files"
    xargs -d '\n' sha256sum <<<"$files"
  ) | sha256sum | cut -c1-12
}

# IMAGE in an OCI layout, with one index entry per REFERENCE (each names itself in
# org.opencontainers.image.ref.name, which `ctr images import` takes as the image's name), packed
# into FILE whole or not at all. buildah pushes once: a second push of the same image would compress
# every layer again only to find the blobs present.
export_archive() { # IMAGE FILE REFERENCE...
  local image=$1 out=$2 layout tmp
  shift 2
  layout=$(mktemp -d "$dir/tmp/layout.XXXXXX")
  b push --quiet "$image" "oci:$layout:$1" >/dev/null
  python3 - "$layout/index.json" "$@" <<'PY'
import json, sys
path, refs = sys.argv[1], sys.argv[2:]
with open(path) as f:
    index = json.load(f)
[entry] = index["manifests"]
index["manifests"] = [
    {**entry, "annotations": {**entry.get("annotations", {}), "org.opencontainers.image.ref.name": ref}} for ref in refs
]
with open(path, "w") as f:
    json.dump(index, f)
PY
  tmp=$(mktemp -u "$archives/.partial.XXXXXX")
  tar -C "$layout" -cf "$tmp" oci-layout index.json blobs
  mv "$tmp" "$out"
  rm -rf "$layout"
}

report() { # ARCHIVE REFERENCE...
  echo "archive=$1"
  shift
  for r in "$@"; do echo "image=$r"; done
}

# The warm path asks buildah nothing: the base's ID is where the last build left it (a build checks
# it), and an archive named after the inputs' hash exists only once it is complete.
base_state=$dir/base/current
try_warm() {
  [ -r "$base_state" ] || return 1
  local ref id mode
  read -r ref id mode <"$base_state"
  [ "$mode" = "$base_mode" ] || return 1
  hash=$(input_hash "$id")
  [ -f "$archives/kvpn-src-$hash.oci.tar" ] || return 1
  if [ -z "$variant" ]; then
    report "$archives/kvpn-src-$hash.oci.tar" "$repo:$app_version" "$repo:src-$hash"
  else
    [ -f "$archives/kvpn-src-$hash-$variant.oci.tar" ] || return 1
    report "$archives/kvpn-src-$hash-$variant.oci.tar" "$repo:$variant"
  fi
}
try_warm && exit 0

# The steps: the base, the build, its export, and the --tag variant. The warm path above takes none.
steps=3
[ -z "$variant" ] || steps=4
ensure_base
echo "$base_ref $base_id $base_mode" >"$base_state"
hash=$(input_hash "$base_id")
tag=src-$hash
main=$archives/kvpn-$tag.oci.tar

# A variant needs the build in the store, not only its archive.
if [ ! -f "$main" ] || { [ -n "$variant" ] && ! b inspect --type image "$repo:$tag" >/dev/null 2>&1; }; then
  prepare_pip
  step "building $repo:$tag from the Dockerfile on $base_ref (about 1.5 min cold; 10-20 s when only sources changed)"
  start=$SECONDS
  # --layers: unchanged steps (apt, the dependencies) come from the store's cache.
  ticking "building $repo:$tag" b bud --network host --pull-never --layers --quiet \
    --build-arg "BASE=$base_ref" "${pip_secrets[@]}" \
    -f "$root/Dockerfile" -t "$repo:$tag" -t "$repo:$app_version" "$root" >/dev/null
  log "built in $((SECONDS - start)) s"
  step "exporting it to $main"
  start=$SECONDS
  ticking "exporting $repo:$tag" export_archive "$repo:$tag" "$main" "$repo:$app_version" "$repo:$tag"
  log "exported in $((SECONDS - start)) s"
else
  log "[$((step_n + 1))-$((step_n + 2))/$steps] $repo:$tag and its archive: built before"
  step_n=$((step_n + 2))
fi

if [ -n "$variant" ]; then
  out=$archives/kvpn-$tag-$variant.oci.tar
  if [ ! -f "$out" ]; then
    step "making $repo:$variant: $repo:$tag with the label dev.kvpn.image.variant=$variant (a few seconds)"
    # A LABEL-only build adds no layer (`buildah commit` of a working container would add an empty one).
    mkdir -p "$dir/tmp/variant"
    printf 'FROM %s\nLABEL dev.kvpn.image.variant=%s\n' "$repo:$tag" "$variant" >"$dir/tmp/variant/Dockerfile"
    b bud --network host --pull-never --layers --quiet -t "$repo:$variant" "$dir/tmp/variant" >/dev/null
    export_archive "$repo:$variant" "$out" "$repo:$variant"
  else
    step "$repo:$variant and its archive: built before"
  fi
fi

# Keeps the store to one build: removes archives of other inputs and every image that is neither
# the base, nor this build or one of its variants, nor a step of this build a later build can reuse
# (the --layers cache: an unnamed image whose layers begin this build's).
gc() {
  find "$archives" -maxdepth 1 -name 'kvpn-src-*.oci.tar' ! -name "kvpn-$tag.oci.tar" ! -name "kvpn-$tag-*.oci.tar" -delete
  local keep=" $base_ref $standin:bookworm $repo:$tag $repo:$app_version " v id names
  for v in "$archives/kvpn-$tag"-*.oci.tar; do
    [ -f "$v" ] || continue
    v=${v##*/kvpn-"$tag"-}
    keep+="$repo:${v%.oci.tar} "
  done
  local chain
  chain=$(b inspect --type image --format '{{range .OCIv1.RootFS.DiffIDs}}{{.}} {{end}}' "$repo:$tag")
  local listing
  listing=$(b images --all --json | python3 -c '
import json, sys
for image in json.load(sys.stdin):
    print(image["id"], *(image["names"] or []))
')
  while read -r id names; do
    if [ -n "$names" ]; then
      # By name: an image that keeps another name loses only this one.
      for n in $names; do
        [[ $keep != *" $n "* && ($n == "$repo:"* || ($base_mode == standin && $n == "$standin:"*)) ]] || continue
        log "removing $n"
        b rmi "$n" >/dev/null 2>&1 || true
      done
    else
      layers=$(b inspect --type image --format '{{range .OCIv1.RootFS.DiffIDs}}{{.}} {{end}}' "$id")
      [[ $chain == "$layers"* ]] && continue
      log "removing a cached step no longer used ($id)"
      b rmi --force "$id" >/dev/null 2>&1 || true
    fi
  done <<<"$listing"
}
gc

if [ -n "$variant" ]; then
  report "$archives/kvpn-$tag-$variant.oci.tar" "$repo:$variant"
else
  report "$main" "$repo:$app_version" "$repo:$tag"
fi
