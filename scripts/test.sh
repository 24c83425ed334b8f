#!/usr/bin/env bash
# Installs everything (scripts/install.sh), lints (ruff check, ruff format --check; the rules are
# pyproject.toml's [tool.ruff]) and runs the test suite. A lint finding fails it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
