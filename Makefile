# liveloop: run `make help` for the list of targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml examples/plugins/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e examples/plugins
	@touch $(STAMP)

venv: $(STAMP) ## Create .venv and install liveloop with its dev tools

protos: $(STAMP) ## Generate Python stubs and the Envoy descriptor set from protos/
	$(BIN)/python tools/generate_protos.py
	$(BIN)/python tools/sync_k8s_envoy.py

check-protos: $(STAMP) ## Fail if the committed stubs differ from protos/
	$(BIN)/python tools/generate_protos.py --check

envoy-config: $(STAMP) ## Regenerate deploy/envoy/envoy.yaml and the k8s ConfigMap from the shared builder
	$(BIN)/python -m libs.stack.envoy_config --write deploy/envoy/envoy.yaml
	$(BIN)/python -m libs.stack.envoy_config --tls --write deploy/envoy/envoy-tls.yaml
	$(BIN)/python tools/sync_k8s_envoy.py --tls-config deploy/envoy/envoy-tls.yaml

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict on libs/ and services/
	$(BIN)/mypy

imports: $(STAMP) ## Check the layers: libs/ never imports services/, the policy imports no grpc or Redis
	$(BIN)/lint-imports

system-packages: ## Install chromium and promtool (Debian packages) when they are missing
	bash tools/ensure_system_packages.sh

test: $(STAMP) system-packages ## Set up .venv and run every check and test (the CI command)
	$(BIN)/python tools/generate_protos.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

demo: $(STAMP) ## Set up .venv, start the local stack, call it through Envoy, stop it
	$(BIN)/python tools/demo.py

up: $(STAMP) ## Start the local stack in the background
	$(BIN)/liveloop up

status: $(STAMP) ## Show every process of the local stack
	$(BIN)/liveloop status

down: $(STAMP) ## Stop the local stack
	$(BIN)/liveloop down

fmt: $(STAMP) ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: ## Remove the local state directory and caches (keeps .venv)
	rm -rf .liveloop .pytest_cache .mypy_cache .ruff_cache

.PHONY: help venv protos check-protos envoy-config lint typecheck imports system-packages test demo up status down fmt clean
