#!/usr/bin/env bash
# The long kill -9 crash-consistency run: tests/e2e/test_crash.py with more rounds.
#
#   bench/crash-loop.sh [rounds]      # default 20; POSTILION_CRASH_SEED=n replays a run
#
# Uses $POSTILION_BIN, else target/debug/postilion (build it first: cargo build -p postilion).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-20}"
bin="${POSTILION_BIN:-$PWD/target/debug/postilion}"
if [[ ! -x "$bin" ]]; then
    echo "no postilion binary at $bin; run: cargo build -p postilion" >&2
    exit 1
fi
POSTILION_BIN="$bin" POSTILION_CRASH_ROUNDS="$rounds" exec python3 -m pytest -q -p no:cacheprovider \
    tests/e2e/test_crash.py -k test_kill9_randomized_loop_loses_nothing
