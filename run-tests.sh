#!/bin/sh
# Run the whole exim-py test suite on a fresh machine: installs the Debian
# peers the tests use (when run as root), makes .venv, installs exim-py into
# it and runs pytest.  Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")"

PEERS="redis-server exim4-daemon-heavy swaks haproxy openssl microsocks"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    for p in $PEERS; do
        dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'

# The twistd plugin lives in twisted/plugins/ at the top of the tree.
PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" exec .venv/bin/python -m pytest "$@"
