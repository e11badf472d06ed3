#!/usr/bin/env bash
# `make bench`: run every benchmarks/bench_*.py, keep what each prints as BENCH lines in
# benchmarks/results/<script>.json (+ .log), then rewrite the table in docs/benchmarks.md.
#   bash benchmarks/run.sh                  # everything (tens of minutes on 2 cores)
#   bash benchmarks/run.sh --quick          # BENCH_QUICK=1: tiny sizes, a smoke test
#   bash benchmarks/run.sh bench_matmul ... # only these scripts (the others' results are kept)
#   --no-setup: do not (re)build benchmarks/.venv-peers; env BENCH_RESULTS / BENCH_DOC move the
#   results folder / the rewritten doc (the tests use both), BENCH_TIMEOUT caps one script (s).
# Peer scripts (bench_peers_*, bench_matmul) run in benchmarks/.venv-peers, made by
# setup_peers.sh; the rest in the project venv. One script failing does not stop the others.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RESULTS=${BENCH_RESULTS:-benchmarks/results}
DOC=${BENCH_DOC:-docs/benchmarks.md}
SETUP=1
PROJECT_PY=.venv/bin/python
PEERS_PY=benchmarks/.venv-peers/bin/python
TIMEOUT=${BENCH_TIMEOUT:-1200}
ONLY=()
for a in "$@"; do
  case "$a" in
    --quick) export BENCH_QUICK=1 ;;
    --no-setup) SETUP=0 ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    -*) echo "error: unknown option $a (use --quick, --no-setup or script names)" >&2; exit 1 ;;
    *) ONLY+=("$(basename "${a%.py}")") ;;
  esac
done
for n in ${ONLY[@]+"${ONLY[@]}"}; do
  [ -f "benchmarks/$n.py" ] || { echo "error: no benchmark named $n (see benchmarks/bench_*.py)" >&2; exit 1; }
done
[ -x "$PROJECT_PY" ] || { echo "error: $PROJECT_PY missing: run 'make venv' first" >&2; exit 1; }
if [ "$SETUP" = 1 ] && ! bash benchmarks/setup_peers.sh; then
  echo "warning: peers env could not be built; peer rows will read n/a" >&2
fi
[ -x "$PEERS_PY" ] && "$PEERS_PY" -c "import torch" 2>/dev/null || PEERS_PY=$PROJECT_PY
mkdir -p "$RESULTS"
FAILED=()

for path in benchmarks/bench_*.py; do
  name=$(basename "$path" .py)
  [ -f "$path" ] || continue
  if [ ${#ONLY[@]} -gt 0 ] && [[ ! " ${ONLY[*]} " == *" $name "* ]]; then continue; fi
  case "$name" in bench_peers_*|bench_matmul) py=$PEERS_PY ;; *) py=$PROJECT_PY ;; esac
  cmd="$py -m benchmarks.$name"
  echo "=== $name: $cmd ($(date -u +%H:%M:%S) UTC)"
  t0=$(date +%s.%N)
  timeout "$TIMEOUT" $cmd 2>&1 | tee "$RESULTS/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')
  [ "$rc" = 0 ] || { echo "warning: $name exited $rc (see $RESULTS/$name.log)" >&2; FAILED+=("$name"); }
  "$PROJECT_PY" -m benchmarks.common collect "$name" "$cmd" "$RESULTS/$name.log" "$rc" "$secs" \
    "$RESULTS/$name.json" --versions-python "$py" || echo "warning: $name printed a bad BENCH line" >&2
done
"$PROJECT_PY" -m benchmarks.common fold "$RESULTS" "$DOC" || exit 1
if [ ${#FAILED[@]} -gt 0 ]; then echo "error: failed: ${FAILED[*]}" >&2; exit 1; fi
