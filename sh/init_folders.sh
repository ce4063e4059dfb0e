#!/usr/bin/env bash
# Create the data/ and record/ folders the scripts read from and write to (as the original does).
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$ROOT/data" "$ROOT/record"
