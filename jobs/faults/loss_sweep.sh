#!/usr/bin/env bash
# Loss-rate sweep under reliable delivery: the same 40 steps at rising message-loss rates.
# Every run ends with the same parameters; what changes is the cost: retransmissions and
# time.  Usage: jobs/faults/loss_sweep.sh [ranks] [rates...]
# Ends with `mpitrain compare` of the runs: runs/loss_sweep/compare.html overlays their
# curves and sets their costs side by side; `mpitrain report runs/loss_sweep/rate-0.05`
# shows one run in detail.  Running the sweep again replaces its earlier runs.
set -euo pipefail
ranks=${1:-2}; shift || true
rates=${*:-0 0.001 0.01 0.05 0.1}
printf '%-8s %10s %16s %14s %10s\n' rate messages retransmitted recovery_s wall_s
outs=()
for rate in $rates; do
  out="runs/loss_sweep/rate-$rate"
  outs+=("$out")
  start=$(date +%s%N)
  mkdir -p "$out"
  mpitrain run -n "$ranks" jobs/faults/reliable.toml --set run.out="\"$out\"" \
    --set "faults.rules=[{kind=\"drop\", probability=$rate}]" --set 'run.progress="off"' \
    --overwrite 2> "$out/stderr.log" || { cat "$out/stderr.log" >&2; exit 1; }
  wall=$(( ($(date +%s%N) - start) / 1000000 ))   # milliseconds
  python3 - "$out" "$rate" "$wall" <<'PY'
import json, sys
out, rate, wall = sys.argv[1:]
t = [json.loads(l) for l in open(f"{out}/events.jsonl") if '"transport"' in l][-1]
print(f"{rate:<8} {int(t['sent']):>10} {int(t['retransmissions']):>16} {t['recovery_s']:>14.3f} {int(wall) / 1000:>10.2f}")
PY
done
echo
mpitrain compare "${outs[@]}" --out runs/loss_sweep/compare.html
