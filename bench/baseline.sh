#!/usr/bin/env bash
# Put the tree of another revision (default: origin's main, else HEAD) into .baseline/ (git-ignored), so that
# bench/gpu_check.sh times those kernels and this tree's in one run on one card: bash bench/baseline.sh [REV]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rev=${1:-$(git rev-parse --verify -q origin/main || git rev-parse HEAD)}
rm -rf .baseline && mkdir .baseline
git archive "$rev" attnreuse bench | tar -x -C .baseline
echo "$rev" > .baseline/REV
echo ".baseline/ holds $(git log -1 --format='%h %s' "$rev")"
