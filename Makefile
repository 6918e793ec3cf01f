# herald: the commands a developer and CI use. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help services cluster demo test bench bench-smoke lint previous

# The previous landed version (N), which tests/it/upgrade.rs runs beside this
# one (N+1) on one topology. Move it forward when a version lands
# (docs/upgrading.md, "Rolling upgrade and rollback").
PREVIOUS ?= 16d191b

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

services: ## Install (if missing) and start RabbitMQ and SecantusDB, wait until both answer
	@bash scripts/services.sh

cluster: ## Also start a local three-node RabbitMQ cluster (127.0.0.1:5681-5683; scripts/cluster.sh)
	@bash scripts/services.sh --cluster

demo: services ## Two organizations, one shared Teams integration: deliveries and dead letters, end to end
	$(CARGO) build --workspace --bins --examples
	./target/debug/examples/demo

test: services ## Unit and integration tests against the real services and teams-sim
	@bash scripts/cluster.sh up
	python3 -m pip install -q --disable-pip-version-check -r examples/python/requirements.txt pyyaml
	$(CARGO) build --workspace --bins --examples
	@$(MAKE) --no-print-directory previous
	BENCH_SCALE=smoke ./target/debug/examples/bench > /dev/null
	$(CARGO) test --workspace --lib --bins --no-fail-fast
	$(CARGO) test --test resilience --no-fail-fast
	$(CARGO) test --test it --features fault-injection --no-fail-fast -- --skip fleetwide --skip cluster::
	@# The fleet tests alone and one at a time: worker processes against Teams' windows
	@# must not share the two cores with other tests (run beside them, one missed its bound twice).
	$(CARGO) test --test it --features fault-injection --no-fail-fast fleetwide -- --test-threads=1
	@# The node-loss test alone, on the three-node cluster (it stops nodes).
	$(CARGO) test --test it --features fault-injection --no-fail-fast cluster:: -- --test-threads=1

# Built in this checkout's target directory with the same command as this
# version's build, so that both share their dependencies' builds (features
# unified alike); this version's binaries are then put back in target/debug.
previous: ## Build version N (PREVIOUS) of `herald` into target/previous/herald, for the upgrade test
	@if [ "$$(cat target/previous/commit 2>/dev/null)" != "$$(git rev-parse $(PREVIOUS))" ]; then \
	  set -e; rm -rf target/previous; mkdir -p target/previous/src; \
	  git archive $(PREVIOUS) | tar -x -C target/previous/src; \
	  echo "building herald $(PREVIOUS) (version N) into target/previous/herald"; \
	  (cd target/previous/src && CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) build -q --workspace --bins --examples); \
	  cp target/debug/herald target/previous/herald; \
	  rm -rf target/previous/src; \
	  git rev-parse $(PREVIOUS) > target/previous/commit; \
	  $(CARGO) build -q --workspace --bins --examples; \
	fi

bench: ## The benchmark (release build, real services, throttling off); writes bench/results/latest.md
	@bash scripts/services.sh --bench --cluster
	$(CARGO) build --release --workspace --bins --examples
	./target/release/examples/bench

lint: ## rustfmt, clippy (warnings are errors), and the deploy/ manifests, rules and dashboard
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	@bash scripts/deploy-tools.sh
	python3 deploy/check.py
