#!/usr/bin/env bash
# Set up .venv (idempotent) and run the main job or the tests.
#   bash scripts/dev.sh setup            only set up .venv
#   bash scripts/dev.sh main [FLAGS]     train the default model on MNIST, evaluate it, write its run folder
#   bash scripts/dev.sh test [ARGS]      run the test suite (ARGS go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The CPU build of torch: on machines that keep a local wheel this is a fast local install,
# and it never pulls a multi-GB CUDA build. Override with TORCH_SPEC="torch" for a GPU build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "mnistlab needs Python 3.11 or newer"'
    "$PYTHON" -m venv .venv
  fi
  # Reinstall only when the dependency list changed since the last setup.
  stamp=".venv/.mnistlab-setup-$(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.mnistlab-setup-*
    touch "$stamp"
  fi
}

# The browser test (tests/test_browser.py) drives the system's Chromium, Debian's package, never a
# browser downloaded by Playwright: install it when it is missing and this machine can.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "dev.sh: installing chromium with apt-get for the browser test" >&2
    apt-get update -qq || true  # a stale list may still do; the install below says if not
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null ||
      echo "dev.sh: apt-get could not install chromium; the browser test will say so" >&2
  else
    echo "dev.sh: chromium is missing and cannot be installed here (needs root and apt-get);" \
         "the browser test skips (and fails under CI=true)" >&2
  fi
}

# The tuning tests start a throwaway PostgreSQL server (initdb + pg_ctl): install Debian's
# package when it is missing and we may (root), so those tests never fail for want of it.
ensure_postgres() {
  if command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "dev.sh: PostgreSQL is missing; install it (apt-get install postgresql) or tests/test_tune.py fails" >&2
  fi
}

# An offline copy of the data sets beside the checkout (as on the project's CI machines) is
# used when MNISTLAB_DATA is not set; elsewhere mnistlab downloads into its cache.
if [ -z "${MNISTLAB_DATA:-}" ] && [ -d ../shared/datasets ]; then
  export MNISTLAB_DATA="$PWD/../shared/datasets"
fi

cmd=${1:-main}; shift || true
case "$cmd" in
  setup) setup ;;
  main) setup; .venv/bin/mnistlab train "$@" ;;
  test) setup; ensure_chromium; ensure_postgres; .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash scripts/dev.sh setup|main|test [ARGS]" >&2; exit 2 ;;
esac
