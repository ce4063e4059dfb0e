#!/usr/bin/env bash
# Install what is missing (test dependencies included) and run the test suite.
# Extra arguments go to pytest, e.g. `bash sh/test.sh -k purify -x`.
# The suite runs in parallel over the machine's cores (pytest-xdist, one worker per core, at most
# 4; every worker and the commands it starts use one thread). TEST_WORKERS=0 runs it in one process,
# TEST_WORKERS=N with N workers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/sh/install.sh" --test
cd "$ROOT"
cores=$(nproc 2>/dev/null || echo 1)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
parallel=()
if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers")
fi
exec "$PY" -m pytest -q tests "${parallel[@]}" "$@"
