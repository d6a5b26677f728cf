# `make demo` and `make test` build .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-cluster venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4/1048576)}'); [ "$$free" -ge 9 ] || echo "warning: $$free GiB free here;"\
	  ".venv takes about 7 GiB (PyTorch's CUDA build) and a test run about 2 more" >&2
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/segtune demo

test: venv
	$(BIN)/python -m pytest -q -rs -m "not chaos and not real"

# Real-size SAM, MedSAM and CLIPSeg against their reference pipelines (a few minutes); .ci/run runs it.
.PHONY: test-real
test-real: venv
	$(BIN)/python -m pytest -q -rs -m real

# The long reliability tests (marker `chaos`): sweeps SIGKILLed, Ctrl-C'd, resumed, their server
# restarted, their workers killed; about ten minutes. .ci/run runs them after `make test`.
.PHONY: test-chaos
test-chaos: venv
	$(BIN)/python -m pytest -q -rs -m chaos

# Only the cluster tests (Ray head + workers, S3, PostgreSQL); `make test` includes them.
test-cluster: venv
	$(BIN)/python -m pytest -q -rs tests/cluster

clean:
	rm -rf $(VENV) .segtune

# Benchmarks 1-7 of issue 6, reduced for 2 cores; each prints ratios measured within its own
# run, and benchmarks/repeat.py runs each 3 times and reports min / median / max (a goal is met
# when the median meets it; results: benchmarks/RESULTS.md; about 15 minutes). `make bench-quick`
# runs each once. GPU: benchmarks/gpu.sh.
BENCH := loop sweep cache_step cache_sweep search data tracking
.PHONY: bench bench-quick
bench: venv
	$(BIN)/python -m benchmarks.repeat --runs 3 $(BENCH)

bench-quick: venv
	$(BIN)/python -m benchmarks.repeat --runs 1 $(BENCH)
