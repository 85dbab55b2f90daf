#!/usr/bin/env bash
# A LLaVA-3D-7B-shaped model end to end on a CPU machine (docs/deploying.md, "A 7B model on 24 GB"):
# the random full-size checkpoint, its float16 and int4 compiles (peak RSS, wall time, size), then
# one int4 prefill pruned against unpruned at LLaVA-3D's token counts (1,400 spatial + 60 text).
#
#   scripts/deploy_7b.sh DIR [THREADS [STEP ...]]
#
# STEPs (default: all, in this order): checkpoint frames calibrate-float32 calibrate-bfloat16 compile-float16
# compile-int4 compile-int4-pruned bench.
# LAYERS=4 scripts/deploy_7b.sh DIR: the same width at depth 4 (minutes; a rehearsal).
# frames: the checkpoint selects FRAMES views per scene (default 1) and 6 generated scenes are written as
# ScanNet folders with their questions (a folder scene gives num_frames views: with one, a prefill of
# a few hundred tokens, so that calibrating on 2 cores takes minutes, not hours); calibrate-*: a
# layer-major calibration (--engine layered) on CAL_SAMPLES statistics questions and CAL_HOLDOUT
# held-back ones of those scenes (defaults 8 and 16; one candidate validated under --flops-budget
# 0.5), whose schedule compile-int4-pruned compiles. CAL_RULES=last_token skips the rule stage (the
# default compares five rules at the chosen cut: several times the validation's time on 2 cores).
# Disk: about 14 GB (checkpoint) + 27 GB (float16 artifact, deleted once measured) + 11 GB (int4).
# Figures accumulate in DIR/summary.txt; each step's log and /usr/bin/time -v report beside it.
set -euo pipefail
D=$(realpath -m "${1:?usage: scripts/deploy_7b.sh DIR [THREADS [STEP ...]]}")
T=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(checkpoint frames calibrate-float32 calibrate-bfloat16 compile-float16 compile-int4
                                 compile-int4-pruned bench)
L=${LAYERS:-32}
cd "$(dirname "$0")/.."  # this checkout's package
mkdir -p "$D"
AC=(python -m adatoken_compile)

timed() {  # timed NAME CMD...: run CMD under /usr/bin/time -v, keep its log, print peak RSS and wall time
    local name=$1; shift
    /usr/bin/time -v -o "$D/$name.time" "$@" > "$D/$name.log" 2>&1
    echo "$name: $(grep -E 'Maximum resident' "$D/$name.time" | awk '{printf "peak RSS %.2f GB", $NF / 1048576}'),\
 $(grep -E 'Elapsed' "$D/$name.time" | awk '{print "wall " $NF}')" | tee -a "$D/summary.txt"
}
size() { echo "$1: $(du -sb "$2" | awk '{printf "%.2f GB", $1 / 1e9}')" | tee -a "$D/summary.txt"; }

for step in "${STEPS[@]}"; do
    case $step in
    checkpoint)
        timed make-tiny "${AC[@]}" make-tiny --preset llava3d-7b --layers "$L" --out "$D/ckpt" --overwrite
        size checkpoint "$D/ckpt" ;;
    frames)
        python - "$D/ckpt/config.json" "${FRAMES:-1}" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["num_frames"] = int(sys.argv[2])
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
PY
        "${AC[@]}" make-scene --count 6 --format scannet --out "$D/scenes" --questions "$D/questions.json" --overwrite
        ;;
    calibrate-float32|calibrate-bfloat16)
        dt=${step#calibrate-}
        timed "$step" "${AC[@]}" calibrate --model "$D/ckpt" --engine layered --dtype "$dt" \
            --data "$D/questions.json" --scenes "$D/scenes" --samples "${CAL_SAMPLES:-8}" \
            --holdout "${CAL_HOLDOUT:-16}" --flops-budget 0.5 --max-validations 1 ${CAL_RULES:+--rules "$CAL_RULES"} \
            --out "$D/cal-$dt" --overwrite
        python - "$D/cal-$dt/schedule.json" <<'PY' | tee -a "$D/summary.txt"
import json, sys
c = json.load(open(sys.argv[1]))["calibration"]
e, p = c["engine"], c["precision"]
print(f"  {p['dtype']} on {p['device']}: {c['samples']} statistics rows, {c['holdout_rows']} held back; per row and layer "
      + ", ".join(f"{k} {e.get(k + '_s_per_sample_layer', 0):.2f} s" for k in ("statistics", "references", "validation"))
      + f"; reading weights {e.get('load_s', 0):.0f} s; smallest top-1 margin {p['min_top1_margin']}")
PY
        ;;
    compile-float16)
        timed compile-float16 "${AC[@]}" compile --model "$D/ckpt" --dtype float16 --out "$D/float16" --overwrite
        size artifact-float16 "$D/float16"
        rm -rf "$D/float16" ;;  # 27 GB; not run here (the CPU provider would hold it as float32)
    compile-int4)
        timed compile-int4 "${AC[@]}" compile --model "$D/ckpt" --quantize int4 --out "$D/int4" --overwrite
        size artifact-int4 "$D/int4" ;;
    compile-int4-pruned)
        # the schedule calibrate-* found; without one, the bundled model's calibrated default cuts
        # (L1:0.7, L2:0.4) for an L-layer model, named for this model (a schedule names the model it is
        # for: the fingerprint from the int4 artifact's manifest, else from the checkpoint)
        for dt in bfloat16 float32; do
            [ -f "$D/cal-$dt/schedule.json" ] && cp "$D/cal-$dt/schedule.json" "$D/schedule.json" && break
        done
        [ -f "$D/schedule.json" ] || python - "$D" "$L" <<'PY'
import json, os, sys
from adatoken_compile.schedule import Cut, Schedule
d, layers = sys.argv[1], int(sys.argv[2])
manifest = os.path.join(d, "int4", "manifest.json")
if os.path.exists(manifest):
    model = json.load(open(manifest))["model"]
    fingerprint, family = model["fingerprint"], model["family"]
else:
    from adatoken_compile import load_model
    m = load_model(os.path.join(d, "ckpt"), lazy=True)
    fingerprint, family = m.fingerprint(), m.family
Schedule([Cut(1, 0.7), Cut(2, 0.4)], layers, policy="adaptive-default", fingerprint=fingerprint,
         family=family).save(os.path.join(d, "schedule.json"))
PY
        timed compile-int4-pruned "${AC[@]}" compile --model "$D/ckpt" --quantize int4 --schedule "$D/schedule.json" \
            --no-decode --out "$D/int4-pruned" --overwrite
        size artifact-int4-pruned "$D/int4-pruned" ;;
    bench)
        timed bench "${AC[@]}" bench --artifact "$D/int4-pruned" --baseline "$D/int4" --tokens 1400,60 --threads "$T" \
            --repeats 3 --json
        python - "$D" <<'EOF' | tee -a "$D/summary.txt"
import json, sys
log = open(f"{sys.argv[1]}/bench.log").read()
p = json.loads(log[log.index("{"):])["prefill"]
print(f"int4 prefill, 1400 spatial + 60 text tokens: pruned {p['latency_s']['pruned']['median_s']:.1f} s vs "
      f"{p['latency_s']['baseline']['median_s']:.1f} s, latency ratio {p['latency_ratio']:.3f}, FLOPs ratio "
      f"{p['flops_ratio']:.3f} (graph {p['flops_ratio_graph']:.3f}), realized fraction {p['realized_fraction']:.2f}, "
      f"overhead fraction {p['overhead_fraction']:.4f}")
EOF
        ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
