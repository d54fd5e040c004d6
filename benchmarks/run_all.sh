#!/usr/bin/env bash
# Regenerates every table of docs/benchmarks.md, with the commands used, into one folder:
#
#   bash benchmarks/run_all.sh [OUT_DIR]        (default OUT_DIR: runs/bench/<UTC date-time>)
#
# Writes OUT_DIR/<script>.txt (full output), OUT_DIR/<script>.json (every repeat, machine, load) and
# OUT_DIR/tables.md: per script the exact command and its final block (machine line, load lines, table), ready to
# paste into docs/benchmarks.md; OUT_DIR/adventurer_vs_vit.png is the figure docs/benchmarks.md embeds
# (cp it to docs/). About 17 minutes on an idle 2-core machine; on a machine other jobs are using, absolute times
# and the 2-thread figures are inflated (every load line says so) -- rerun when the load average is near 0.
#
# Environment: PY (default .venv/bin/python); WAIT_QUIET_S (see wait_quiet below). The mcr2-opt baseline needs
# opt_einsum; where the interpreter cannot import it, it is installed with pip into OUT_DIR/_pydeps (not into the
# environment) and used by the two MCR² scripts only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/bench/$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
TABLES="$OUT/tables.md"
: > "$TABLES"

MCR2_PATH=${PYTHONPATH:-}
if ! "$PY" -c "import opt_einsum" 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --target "$OUT/_pydeps" opt_einsum==3.4.0
  MCR2_PATH="$OUT/_pydeps${MCR2_PATH:+:$MCR2_PATH}"
fi

echo "run_all: $(date -u '+%F %T') UTC, load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores; out $OUT"
T_ALL=$(date +%s)

# Before each script, wait up to WAIT_QUIET_S seconds (default 0: do not wait) until other processes leave the
# machine idle (under 10% of its CPU time busy over 5 s, from /proc/stat), so that a rerun on a machine that other
# jobs use at times catches the quiet spells. (Not the load average: it lags a minute and counts our own threads.)
WAIT_QUIET_S=${WAIT_QUIET_S:-0}
busy_pct() {
  local a b busy total
  read -r -a a < /proc/stat
  sleep 5
  read -r -a b < /proc/stat
  busy=$(( (b[1] + b[2] + b[3] + b[6] + b[7]) - (a[1] + a[2] + a[3] + a[6] + a[7]) ))
  total=$(( busy + (b[4] + b[5] + b[8]) - (a[4] + a[5] + a[8]) ))
  echo $(( 100 * busy / (total > 0 ? total : 1) ))
}
wait_quiet() {
  local waited=0
  while [ "$waited" -lt "$WAIT_QUIET_S" ] && [ "$(busy_pct)" -ge 10 ]; do
    waited=$((waited + 5))
  done
}

# run NAME CMD...: full output to OUT/NAME.txt; the command and the block from the last "machine:" line on
# (the summary every script prints last) appended to tables.md.
run() {
  local name=$1 t0
  shift
  wait_quiet
  t0=$(date +%s)
  echo "== $name: $* (load average $(cut -d' ' -f1 /proc/loadavg))"
  "$@" > "$OUT/$name.txt" 2>&1 || { tail -30 "$OUT/$name.txt"; echo "== $name FAILED"; exit 1; }
  local took=$(( $(date +%s) - t0 ))
  {
    echo "### $name"
    echo
    echo "Command: \`$(echo "$*" | sed "s#$OUT#<out>#g; s#^env ##; s#PYTHONPATH=[^ ]* ##; s#$PY #python #")\` ($took s)"
    echo
    awk '/^machine: /{buf=""} {buf=buf $0 "\n"} END{printf "%s", buf}' "$OUT/$name.txt" | grep -v '^wrote '
    echo
  } >> "$TABLES"
  echo "== $name took $took s"
}

run rate_speed env PYTHONPATH="$MCR2_PATH" "$PY" benchmarks/rate_speed.py --threads 1 2 --repeats 5 \
  --sizes 1000,128,10 5000,512,50 --json "$OUT/rate_speed.json"
run mcr2_gap env PYTHONPATH="$MCR2_PATH" "$PY" benchmarks/mcr2_gap.py --threads 1 2 --repeats 5 \
  --json "$OUT/mcr2_gap.json"
run ssd_speed "$PY" benchmarks/ssd_speed.py --threads 1 2 --repeats 5 --lengths 256 1024 4096 \
  --json "$OUT/ssd_speed.json"
run crate_speed "$PY" benchmarks/crate_speed.py --threads 1 2 --repeats 5 --batch-size 32 \
  --json "$OUT/crate_speed.json"
run adventurer_vs_vit "$PY" benchmarks/adventurer_vs_vit.py --quick --models adventurer,vit --threads 1 2 \
  --repeats 5 --plot "$OUT/adventurer_vs_vit.png" --json "$OUT/adventurer_vs_vit.json"
# The same 4096-token inference with every vectorized library held to AVX2 (ATen, MKL, oneDNN): how much of the
# Adventurer / ViT ratio depends on the CPU's AVX-512 (docs/benchmarks.md, "Adventurer vs ViT").
run adventurer_vs_vit_avx2 env ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  "$PY" benchmarks/adventurer_vs_vit.py --sides 1024 --models adventurer,vit --threads 1 --repeats 5 \
  --skip-train --no-memory --json "$OUT/adventurer_vs_vit_avx2.json"
run crate_alpha_speed "$PY" benchmarks/crate_alpha_speed.py --threads 1 2 --json "$OUT/crate_alpha_speed.json"
# VAR / M-VAR sampling at depth 16, widths 256 and 1024 (the real d16 width; about 7 min on an idle machine).
run var_sampling "$PY" benchmarks/var_sampling.py --threads 1 2 --repeats 5 --json "$OUT/var_sampling.json"
# DP-SGD step (ghost / hooks / functorch) vs the non-DP step, DP-Cap pico and tiny captioners (about 5 min idle).
run dp_step env MALLOC_MMAP_THRESHOLD_=131072 "$PY" benchmarks/dp_step.py --threads 1 2 --repeats 5 \
  --json "$OUT/dp_step.json"
# Thread count under oversubscription (docs/benchmarks.md "Threads"; the default of `ratelab train --threads`).
run threads_oversubscription "$PY" benchmarks/threads_oversubscription.py --repeats 5 \
  --json "$OUT/threads_oversubscription.json"

echo "run_all: done in $(( $(date +%s) - T_ALL )) s, load average $(cut -d' ' -f1-3 /proc/loadavg); tables: $TABLES"
