#!/usr/bin/env bash
# Install what is missing (test dependencies included) and run the test suite.
# Extra arguments go to pytest, e.g. `bash sh/test.sh -k purify -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/sh/install.sh" --test
cd "$ROOT"
exec "$PY" -m pytest -q tests "$@"
