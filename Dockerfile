# One image, every program: kvpn-operator (the default command), kvpn-agent, kvpn-relay and kubectl-vpn.
# The Helm chart sets the command of each role. Build from the repository root, with BuildKit (Docker's
# default builder since 23.0: RUN --mount) or buildah:
#   docker build -t kvpn:0.1.0 .
#   hack/image.sh          # without Docker: buildah, a local stand-in base, an archive for containerd
#
# BASE names the base image so a local stand-in can replace the registry's (hack/image.sh builds one
# with debootstrap where no registry is reachable). Fully qualified, so buildah and podman need no
# short-name resolution.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

# The runtime dependencies, read from pyproject.toml. A stage of its own so that the layer installing
# them is keyed on this list alone: editing a .py file or pyproject.toml's tool settings reuses it.
FROM ${BASE} AS requirements
COPY pyproject.toml /
# The base list is the kubectl plugin's; the operator and the agent add their extras.
RUN python -c 'import tomllib; p = tomllib.load(open("/pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["operator"] + p["optional-dependencies"]["agent"]))' \
      >/requirements.txt

FROM ${BASE}

# The agent's dataplane tools: wg and wg-quick, wireguard-go (nodes without the kernel module), nft,
# ip. Nothing else: the operator needs none of them, but one image keeps releases simple. Neither the
# package lists nor the downloaded .debs stay (the official base's apt deletes .debs by itself, a
# debootstrapped stand-in's does not).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      wireguard-tools wireguard-go nftables iproute2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log

# The chart runs the operator as uid/gid 65532 (Pod Security "restricted"). Without a passwd entry
# getpass.getuser() raises, and kopf derives its peering identity from it; home /nonexistent, as
# Debian's own system users have, because nothing may write there (the root filesystem is read-only).
RUN echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >>/etc/passwd \
 && echo 'nonroot:x:65532:' >>/etc/group

# No pip cache in any layer. pip installs as root into the system Python on purpose: the image is the
# environment, no venv needed.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# pip's settings for this build only, as optional build secrets (BuildKit: `docker build --secret
# id=pip-conf,src=FILE`; hack/image.sh passes the host's index and CA this way): a TLS-intercepting
# proxy or a private index must reach the build, but neither its CA nor its credentials belong in a
# layer or in the image's history, as a build ARG would be. Without the secrets pip uses its defaults.
COPY --from=requirements /requirements.txt /tmp/
RUN --mount=type=secret,id=pip-conf --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY core/ core/
COPY operator/ operator/
COPY agent/ agent/
COPY cli/ cli/
COPY relay/ relay/
# The project itself (no [dev] extra; its dependencies are above), compiled ahead: the root filesystem
# is read-only at run time. Then every console script pyproject.toml declares must answer --help, so
# an entry point whose package was left out fails the build, not a pod; and `pip check` that the
# dependencies installed above satisfy the project's.
RUN --mount=type=secret,id=pip-conf --mount=type=secret,id=pip-cert \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi \
 && pip install --no-deps . \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && scripts=$(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"])') \
 && for script in $scripts; do "$script" --help >/dev/null || { echo "$script --help failed" >&2; exit 1; }; done \
 && pip check \
 && cd / && rm -rf /src /root/.cache

WORKDIR /
# The operator runs as this unprivileged user (the chart's Pod Security "restricted"); the agent's
# DaemonSet runs it as root with NET_ADMIN as its only capability.
USER 65532:65532
CMD ["kvpn-operator"]
