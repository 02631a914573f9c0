#!/usr/bin/env bash
# GPU checks of vdit on one H100/H200 in at most 8 minutes; prints every number and a pass/fail summary.
# What each section measures and what its numbers mean: the docstring of bench/gpu_check.py.
#
#   bash bench/gpu_check.sh                                 # all sections (one GPU)
#   bash bench/gpu_check.sh kernels ring step               # some sections
#   OMP_NUM_THREADS=1 bash bench/gpu_check.sh --cpu-smoke   # the plumbing on CPU, tiny shapes, < 1 min
#
# Environment: PYTHON (default .venv/bin/python, else python), GPU_CHECK_OUT (folder for results.jsonl;
# default a new folder under runs/), GPU_CHECK_TMP (where the step's DCP checkpoint is written; default
# the system temp dir), GPU_CHECK_BUDGET_S (total wall budget, default 480).
#
# Each section is its own process under `timeout` (budget below, capped by what is left of the total);
# a section that fails, crashes or times out is recorded as failed and the next one runs.
# step_compiled (the 1.3B step under torch.compile) is optional: it runs only when at least 100 s are
# left after reserving the pytest section's 60 s, and a timeout there counts as skipped, not failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SMOKE=()
SELECTED=()
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=(--cpu-smoke) ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) SELECTED+=("$arg") ;;
  esac
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT="${GPU_CHECK_OUT:-runs/gpu_check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
TOTAL="${GPU_CHECK_BUDGET_S:-480}"
START=$(date +%s)

# section:budget_s, in running order
ORDER=(kernels:35 ring:35 dtypes:35 compile:120 syncs:50 step:140 step_compiled:0 pytest:60)  # 475 s
PYTEST_RESERVE=60

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
wanted() {
  [[ ${#SELECTED[@]} -eq 0 ]] && return 0
  local s; for s in "${SELECTED[@]}"; do [[ "$s" == "$1" ]] && return 0; done
  return 1
}
record() {  # record SECTION STATUS NOTE: a JSON line for a section that could not write its own
  "$PY" -c 'import json, sys; s, st, e = sys.argv[1:4]; print(json.dumps({"section": s, "status": st, "error": e}))' \
    "$1" "$2" "$3" | tee -a "$RESULTS"
}

log "vdit GPU check: python $PY, results $RESULTS, budget ${TOTAL}s${SMOKE:+, CPU smoke}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' || true

for entry in "${ORDER[@]}"; do
  section="${entry%%:*}"; budget="${entry##*:}"
  wanted "$section" || continue
  remaining=$(left)
  if [[ "$section" == step_compiled ]]; then
    budget=$(( remaining - PYTEST_RESERVE ))
    if (( budget < 100 )) && [[ ${#SMOKE[@]} -eq 0 ]]; then
      log "== $section: skipped (${budget}s left after the pytest reserve, needs 100 s)"
      record "$section" skipped "not enough time left (${budget}s)"
      continue
    fi
    (( budget < 100 )) && budget=100  # smoke: tiny, always run
  fi
  (( budget > remaining )) && budget=$remaining
  if (( budget < 5 )); then
    log "== $section: skipped (total budget spent)"
    record "$section" skipped "total budget of ${TOTAL}s spent"
    continue
  fi
  log "== $section (timeout ${budget}s)"
  before=$(wc -l < "$RESULTS")
  rc=0
  if [[ "$section" == pytest ]]; then
    targets=()
    [[ ${#SMOKE[@]} -gt 0 ]] && targets=(tests/test_attention_backends.py tests/test_ring_precision.py)
    timeout --kill-after=10 "$budget" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${targets[@]}" \
      > "$OUT/pytest.log" 2>&1 || rc=$?
    tail -n 15 "$OUT/pytest.log"
    last=$(tail -n 1 "$OUT/pytest.log")
    case "$rc" in
      0) if [[ ${#SMOKE[@]} -gt 0 ]]; then status=skipped; last="skipped: needs CUDA ($last)"; else status=pass; fi ;;
      5) status=skipped; last="no gpu-marked tests collected ($last)" ;;
      124|137) status=fail; last="timeout after ${budget}s ($last)" ;;
      *) status=fail ;;
    esac
    record pytest "$status" "$last" > /dev/null
    tail -n 1 "$RESULTS"
  else
    timeout --kill-after=10 "$budget" "$PY" bench/gpu_check.py "${SMOKE[@]}" --out "$RESULTS" "$section" || rc=$?
    if (( $(wc -l < "$RESULTS") == before )); then  # killed or crashed before its JSON line
      if (( rc == 124 || rc == 137 )) && [[ "$section" == step_compiled ]]; then
        record "$section" skipped "optional: timed out after ${budget}s (compile did not fit the time left)"
      elif (( rc == 124 || rc == 137 )); then
        record "$section" fail "timeout after ${budget}s"
      else
        record "$section" fail "exit status $rc without a result line"
      fi
    fi
  fi
  log "== $section done (exit $rc)"
done

log "summary ($(( $(date +%s) - START ))s of ${TOTAL}s)"
"$PY" - "$RESULTS" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    note = r.get("error") or r.get("note") or ""
    print(f"  {r['section']:<14} {r['status'].upper():<8} {note[:110]}")
EOF
summary_rc=0
"$PY" bench/gpu_check.py summary --out "$RESULTS" || summary_rc=$?
log "results: $RESULTS"
exit "$summary_rc"
