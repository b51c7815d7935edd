# One image, both programs: kvpn-operator (the default command) and kvpn-agent. The Helm chart sets
# the command of each role. Build from the repository root:
#   docker build -t kvpn:0.1.0 .
FROM python:3.11-slim-bookworm

# The agent's dataplane tools: wg and wg-quick, wireguard-go (nodes without the kernel module), nft,
# ip. Nothing else: the operator needs none of them, but one image keeps releases simple.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      wireguard-tools wireguard-go nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY agent/ agent/
# The project and its runtime dependencies only (no [dev] extra), compiled ahead: the root
# filesystem is read-only at run time.
RUN pip install . \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && cd / && rm -rf /src \
 && kvpn-operator --help >/dev/null && kvpn-agent --help >/dev/null

WORKDIR /
# The operator runs as this unprivileged user (the chart's Pod Security "restricted"); the agent's
# DaemonSet runs it as root with NET_ADMIN as its only capability.
USER 65532:65532
CMD ["kvpn-operator"]
