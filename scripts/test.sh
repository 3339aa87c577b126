#!/usr/bin/env bash
# The test command: the whole suite, fast unit tests and the short real-model runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -p no:cacheprovider "$@"
