#!/usr/bin/env bash
# The long fuzz run of #10: every target of tests/fuzz/targets.py under atheris
# (coverage-guided), SECONDS each (default 60: 11 targets, 11 minutes), memory capped at
# 1 GiB and 20 s an input. Prints the inputs each target ran; crashing inputs land in
# WORKDIR as TARGET-crash-*: add them to tests/fuzz/corpus/TARGET/ once fixed.
# Usage: scripts/fuzz.sh [SECONDS] [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
work=${2:-$(mktemp -d)}
.venv/bin/python -c "import atheris" 2>/dev/null || .venv/bin/pip install -q atheris
targets=$(.venv/bin/python -c "from tests.fuzz.targets import TARGETS; print(*TARGETS)")
status=0
for target in $targets; do
    .venv/bin/python -m tests.fuzz.run "$target" "$seconds" "$work" >"$work/$target.log" 2>&1 \
        || status=1
    runs=$(awk '/number_of_executed_units/ {print $2}' "$work/$target.log")
    echo "fuzz: $target: ${runs:-no count (see $work/$target.log)} inputs"
done
crashes=$(find "$work" -maxdepth 1 -name '*-crash-*' -o -maxdepth 1 -name '*-oom-*' \
          -o -maxdepth 1 -name '*-timeout-*' | wc -l)
echo "fuzz: $crashes failing inputs in $work"
[ "$crashes" = 0 ] || status=1
exit "$status"
