#!/usr/bin/env bash
# The GPU check a reviewer runs once: ex1 (default recipe) and ex2 --scratch, fp16 and bf16 runs resumed, ex1
# --compile and --time-budget 1, and benchmarks/speed.py, each in its own run folder; a failing step does not stop
# the others. What each step runs, what OUT_DIR gets and how long it takes: docs/benchmarks.md#gpu_checksh.
#
#   bash benchmarks/gpu_check.sh BUNDLE OUT_DIR [--smoke]    # --smoke: the same steps on the CPU, tiny settings
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), EX1_EPOCHS and EX2_EPOCHS (default 30),
# CIFAR_TOOL (the bundle's decoder; default cifar10_from_jpeg.py beside it, else in ../tools/ beside it) and
# GPU_CHECK_WORK (data and runs; default a new temporary folder). Exit code 1 when a step failed, 2 on a usage error.
set -uo pipefail

fail() { echo "$1" >&2; exit 2; }
absolute() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
[[ $# -eq 2 || ( $# -eq 3 && $3 == --smoke ) ]] || fail "usage: bash benchmarks/gpu_check.sh BUNDLE OUT_DIR [--smoke]"
[[ -f $1 ]] || fail "error: bundle $1 not found"
BUNDLE=$(absolute "$1")
for TOOL in "${CIFAR_TOOL:-}" "$(dirname "$BUNDLE")/cifar10_from_jpeg.py" "$(dirname "$BUNDLE")/../tools/cifar10_from_jpeg.py"; do
  if [[ -f $TOOL ]]; then break; fi
done
[[ -f $TOOL ]] || fail "error: no decoder: put cifar10_from_jpeg.py beside $1 or name it in CIFAR_TOOL"
TOOL=$(absolute "$TOOL")
mkdir -p "$2" || exit 2
OUT=$(cd "$2" && pwd) SMOKE=${3:-}
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
DATA=$WORK/data LOG=$OUT/gpu_check.log
mkdir -p "$WORK/steps" "$WORK/speed" || exit 2
export PYTHONUNBUFFERED=1

if [[ -n $SMOKE ]]; then  # every step but fp16, which the scripts refuse on a CPU
  DEV=(--device cpu) FRESH=(--limit-train 32 --val-size 32 --batch-size 16 --corruptions 0) RESUMED=(--corruptions 0)
  SPEED=(--images 200 --batch-size 100 --aug-images 128 --warmup 1 --workers 1) BUDGET=0.5 BF16=1 FP16=fp32
  EX1_EPOCHS=${EX1_EPOCHS:-1} EX2_EPOCHS=${EX2_EPOCHS:-1}
else
  DEV=(--device cuda) FRESH=() RESUMED=() SPEED=() BUDGET=1 FP16=fp16
  BF16=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)))')
fi
RUN=(--data-dir "$DATA" --no-download --no-tensorboard "${DEV[@]}")  # every training call

: > "$LOG"; : > "$WORK/steps.tsv"
# step NAME RUN_DIR CMD...: run CMD, its output (progress bars: last state) into the log, exit code and seconds into
# steps.tsv, and the run's metrics.json and history.json into steps/ when this call wrote them (a resume rewrites them).
step() {
  local name=$1 dir=$2 start rc seconds; shift 2
  echo "== $name: $*"
  touch "$WORK/steps/$name.start"; start=$(date +%s.%N)
  "$@" 2>&1 | sed 's/.*\r//' > "$WORK/steps/$name.log"; rc=${PIPESTATUS[0]}
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$dir" "$*" >> "$WORK/steps.tsv"
  { echo "===== $name (exit $rc, ${seconds}s): $*"; cat "$WORK/steps/$name.log"; } >> "$LOG"
  for f in metrics history; do
    if [[ $dir/$f.json -nt $WORK/steps/$name.start ]]; then cp "$dir/$f.json" "$WORK/steps/$name.$f.json"; fi
  done
  if [[ $rc -eq 0 ]]; then echo "   done in ${seconds}s"; return 0; fi
  echo "   FAILED (exit $rc) after ${seconds}s:"; tail -n 12 "$WORK/steps/$name.log" | sed 's/^/   | /'
  return "$rc"
}
ex1() { step "$1" "$WORK/$2" "$PYTHON" ex1_convnet.py --out-dir "$WORK/$2" "${RUN[@]}" "${@:3}"; }  # ex1 NAME DIR FLAGS

environment() {
  "$PYTHON" -c 'import sys, torch; print(sys.version, torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'
  if command -v nvidia-smi > /dev/null; then nvidia-smi; fi; return 0
}

trim_test() {  # --smoke: the first 200 test images only (the bundle's test batch starts with the official first 1,000)
  "$PYTHON" - "$DATA/cifar-10-batches-py/test_batch" <<'EOF'
import pickle, sys
with open(sys.argv[1], "rb") as f:
    record = {k: v[:200] if k in ("data", "labels", "filenames") else v for k, v in pickle.load(f).items()}
with open(sys.argv[1], "wb") as f:
    pickle.dump(record, f, protocol=4)
EOF
}

echo "gpu_check${SMOKE:+ (smoke)}: python $PYTHON, scratch $WORK, results $OUT"
step environment - environment
step decode - "$PYTHON" "$TOOL" "$DATA" "$BUNDLE" || exit 1
if [[ -n $SMOKE ]]; then step smoke-test-set - trim_test || exit 1; fi
step speed "$WORK/speed" "$PYTHON" benchmarks/speed.py --data-dir "$DATA" --json "$WORK/speed/metrics.json" \
  "${DEV[@]}" "${SPEED[@]}"
ex1 ex1 ex1 --overwrite "${FRESH[@]}" --precision auto --epochs "${EX1_EPOCHS:-30}"
step ex2-scratch "$WORK/ex2-scratch" "$PYTHON" ex2_transfer.py --scratch --out-dir "$WORK/ex2-scratch" "${RUN[@]}" \
  --overwrite "${FRESH[@]}" --precision auto --epochs "${EX2_EPOCHS:-30}"
ex1 fp16 fp16 --overwrite "${FRESH[@]}" --precision "$FP16" --epochs 2
ex1 fp16-resume fp16 --resume --epochs 3 --precision "$FP16" "${RESUMED[@]}"
if [[ $BF16 == 1 ]]; then
  ex1 bf16 bf16 --overwrite "${FRESH[@]}" --precision bf16 --epochs 2
  ex1 bf16-resume-fp16 bf16 --resume --epochs 3 --precision "$FP16" "${RESUMED[@]}"
else
  printf 'bf16\tskipped\t0\t-\tno native bf16 (compute capability below 8.0)\n' >> "$WORK/steps.tsv"
fi
ex1 compile compile --overwrite "${FRESH[@]}" --compile --epochs 2
ex1 time-budget time-budget --overwrite "${FRESH[@]}" --time-budget "$BUDGET"

"$PYTHON" - "$WORK" "$OUT" "${SMOKE:-full}" <<'EOF'
"""gpu_check.json and gpu_check.md from steps.tsv and the metrics.json and history.json each step wrote."""
import json, sys
from pathlib import Path

import torch

work, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].lstrip("-")
columns = {"epochs_run": "", "test_accuracy": ".2%", "test_accuracy_first1000": ".2%", "train_seconds": ".0f",
           "precision": "", "peak_memory_mb": ",.0f"}  # the headline figures, each with its format in the table
load = lambda p: json.loads(p.read_text()) if p.exists() else None  # noqa: E731
fmt = lambda v, spec="": "—" if v is None else format(v, spec)  # noqa: E731
steps, rows = [], []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, run_dir, command = line.split("\t")
    m, history = (load(work / "steps" / f"{name}.{kind}.json") for kind in ("metrics", "history"))
    s = {"name": name, "command": command, "exit_code": None if rc == "skipped" else int(rc), "seconds": float(seconds),
         **{k: (m or {}).get(k) for k in columns}}
    problem = f"exit {rc}" if rc not in ("0", "skipped") else None
    if rc == "0" and m is None and run_dir != "-":
        problem = "wrote no metrics.json: " + (work / "steps" / f"{name}.log").read_text().strip().splitlines()[-1][-120:]
    note = "skipped: " + command if rc == "skipped" else ""
    if "resume" in name and history:
        s["epoch_precisions"] = [r.get("precision") for r in history]
        note = "epochs in " + ", ".join(map(str, s["epoch_precisions"]))
        wanted = "float16" if mode == "full" else "float32"  # the smoke's CPU has no fp16
        if len(history) != 3 or s["epoch_precisions"][-1] != wanted:
            problem = problem or f"epochs after the resume: {s['epoch_precisions']}, not 3 ending in {wanted}"
    elif name == "speed" and m:
        note = f"images/s: loop {m['loop_img_s']:,.0f}, model {m['model_img_s']:,.0f}, original {m['original_img_s']:,.0f}"
    steps.append({**s, "ok": problem is None, "problem": problem, "metrics": m})
    cells = [name, fmt(s["exit_code"]), f"{s['seconds']:.0f}", *(fmt(s[k], spec) for k, spec in columns.items())]
    rows.append("| " + " | ".join([*cells, problem or note]) + " |")

device = (f"{torch.cuda.get_device_name(0)}, compute capability " + "%d.%d" % torch.cuda.get_device_capability(0)
          if torch.cuda.is_available() else "no CUDA GPU")
failed = [s["name"] for s in steps if not s["ok"]]
lines = [f"# GPU check ({mode}): {device}, torch {torch.__version__}", "",
         "| step | exit | seconds | epochs | test acc | first 1000 | train s | precision | peak MiB | note |",
         "|---|---:|---:|---:|---:|---:|---:|---|---:|---|", *rows, "",
         f"{len(steps) - len(failed)} of {len(steps)} steps ok" + (f"; failed: {', '.join(failed)}" if failed else "")]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
(out / "gpu_check.json").write_text(json.dumps({"mode": mode, "device": device, "torch": torch.__version__,
                                                "failed": failed, "steps": steps}, indent=2) + "\n")
print("\n" + "\n".join(lines))
print(f"wrote {out}/gpu_check.json, gpu_check.md and gpu_check.log (runs and checkpoints: {work})")
sys.exit(1 if failed else 0)
EOF
