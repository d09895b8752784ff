# Two entry points for a fresh machine with Python 3.11 and pip (see README):
#   make demo   - install everything, then build, attack, score and show the leaderboard
#   make test   - install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test lint test-slow test-deploy bench serve clean

$(BIN)/ncbench: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU build of PyTorch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,test]'
	touch $(BIN)/ncbench

install: $(BIN)/ncbench

demo: install
	$(BIN)/ncbench demo --out demo-out

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q --durations=20

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# The several-machine deployment of docs/deploy.md on loopback: PostgreSQL, a Dask scheduler and two
# workers, two servers behind nginx with TLS, a server and a worker killed mid-run (a few minutes).
test-deploy: install
	$(BIN)/python -m pytest -q -s -m deploy tests/test_deploy.py

bench: install
	$(BIN)/python benchmarks/run.py

serve: install
	$(BIN)/ncbench leaderboard serve --db demo-out/leaderboard.db

clean:
	rm -rf $(VENV) demo-out runs *.egg-info
