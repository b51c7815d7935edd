#!/usr/bin/env bash
# Fetches (once) and caches Prometheus from Debian 12's prometheus package, for the end-to-end test that
# runs the chart's dashboard queries against a real Prometheus scraping the agents. Prints the folder
# that holds the `prometheus` binary.
#
# Nothing is installed: the package is downloaded through a private apt configuration under the cache
# folder and unpacked there (its service, users and configuration are not wanted).
set -euo pipefail

cache=${KVPN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpn}
bin=$cache/prometheus/bin
if [ -x "$bin/prometheus" ]; then echo "$bin"; exit 0; fi

log() { echo "prometheus: $*" >&2; }
work=$cache/prometheus/work
apt_dir=$cache/prometheus/apt
mkdir -p "$bin" "$work" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"

# The archive address and keyring the machine already trusts for bookworm.
sources=/etc/apt/sources.list.d/debian.sources
uri=$(awk '/^URIs:/ {print $2; exit}' "$sources")
keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$sources")
[ -n "$uri" ] && [ -n "$keyring" ] || { log "cannot read the Debian archive from $sources"; exit 1; }
echo "deb [signed-by=$keyring] $uri bookworm main" >"$apt_dir/sources.list"
papt() {
  apt-get -q -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
    -o APT::Sandbox::User=root "$@"
}

log "reading package lists"
papt update >&2
log "fetching the prometheus package (about 20 MB)"
rm -f "$work"/prometheus_*.deb
(cd "$work" && papt download prometheus/bookworm >&2)
rm -rf "$work/unpacked" && dpkg-deb -x "$work"/prometheus_*.deb "$work/unpacked"
cp "$work/unpacked/usr/bin/prometheus" "$bin/prometheus.partial" && mv "$bin/prometheus.partial" "$bin/prometheus"
rm -rf "$work"
"$bin/prometheus" --version >&2
echo "$bin"
