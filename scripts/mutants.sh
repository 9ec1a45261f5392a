#!/usr/bin/env bash
# Curated kernel-level mutation testing: applies each deliberate bug listed in
# scripts/mutants.py to a scratch copy of the tree, one at a time, runs scripts/test.sh
# there (--quick by default, --full for the whole suite), and prints `caught NAME` or
# `SURVIVED NAME` per mutation and a closing `N passed, M failed` line. Not part of
# scripts/test.sh: it takes about 2-3 minutes per mutation with --quick (TCG, 2 host
# cores). `--check-applies` (or `--check`) runs no test: it checks in a second that
# every mutation's text occurs exactly once in its file, one line per stale one, exit
# 1 if any (scripts/test.sh runs it as `mutants-apply`). See docs/TESTING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "mutants: python3 is needed" >&2; exit 2; }
exec python3 scripts/mutants.py "$@"
