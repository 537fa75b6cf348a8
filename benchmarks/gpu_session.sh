#!/usr/bin/env bash
# The GPU session, in two device calls of under 10 minutes each (logs and results in $OUT):
#   bash benchmarks/gpu_session.sh check   # conformance of every GPU backend on CUDA
#   bash benchmarks/gpu_session.sh bench   # standard grid + decode beside SDPA, torch-blocked
# and the fp32 comparison behind the fp32 table (benchmarks/NOTES.md, twentieth session):
#   bash benchmarks/gpu_session.sh fp32-tma   # the table's TMA choice, +maxnreg, pointers
# and why fp32 decoding at head dim 256 reads 0.09 TB/s on 4 warps (NOTES.md, twenty-second):
#   bash benchmarks/gpu_session.sh decode-d256   # Nsight Compute stall reasons, 4 warps vs 8
# Each starts by installing the project (editable, no deps: the device has no network).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attnkit-out}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . -e plugins/torch_blocked -e plugins/triton \
    -e plugins/cupy > /tmp/install.log 2>&1 || { tail -30 /tmp/install.log; exit 1; }
python -m attnkit.cli backends 2>&1 | grep -E "^[a-z]|available|FAILED"
summary() { grep -E "passed|failed|error|attnkit conformance" "$1" | tail -3; }

case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    python -c "import torch, triton, cupy; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cupy', cupy.__version__)"
    for b in triton cupy torch-blocked; do
        timeout "${CHECK_TIMEOUT:-200}" python -m attnkit.cli check "$b" --device cuda -- \
            -n 8 -p no:randomly > "$OUT/check-$b.log" 2>&1
        echo "== attnkit check $b --device cuda: rc=$?"; summary "$OUT/check-$b.log"
    done
    # > 2^31 elements (64-bit offsets), alone: --match selects none of the other cases.
    timeout 90 python plugins/triton/scripts/check_cuda.py --subset extra --paths auto \
        --match only-the-large-problem > "$OUT/check-triton-large.log" 2>&1
    echo "== triton > 2^31 elements: rc=$?"; tail -3 "$OUT/check-triton-large.log"
    python benchmarks/overhead.py --device cuda --out "$OUT/overhead_cuda.json"
    ;;
bench)
    python -m attnkit.cli bench --out "$OUT/h100" --no-plot --quiet \
        --backends triton,cupy,sdpa-flash,sdpa-cudnn --time-limit-s 300 > "$OUT/bench.log" 2>&1
    echo "== bench rc=$?"
    python -m attnkit.cli bench --decode --out "$OUT/h100" --no-plot --quiet \
        --time-limit-s 60 >> "$OUT/bench.log" 2>&1
    echo "== decode rc=$?"
    python plugins/torch_blocked/scripts/measure_cuda.py --budget-s 120 \
        --out "$OUT/torch_blocked_cuda.json" > "$OUT/torch_blocked.log" 2>&1
    echo "== torch-blocked rc=$?"; tail -15 "$OUT/torch_blocked.log"
    tail -c 5000 "$OUT/bench.log"
    ;;
fp32-tma)
    # The table's TMA choice per kernel, the same with maxnreg=255, pointers everywhere
    # (ATTNKIT_TRITON_TMA=0); a cold cache each.
    for D in 128 64; do
        for run in "auto" "auto 255" "0"; do
            set -- $run
            log="$OUT/fp32-d$D-tma$1-reg${2:-none}.log"
            TRITON_CACHE_DIR="/tmp/tc-fp32-$D-$1-${2:-none}" ATTNKIT_TRITON_TMA=$1 timeout 90 \
                python benchmarks/fp32_tiles.py --head-dim "$D" ${2:+--maxnreg $2} > "$log" 2>&1
            echo "== fp32 D=$D ATTNKIT_TRITON_TMA=$1 maxnreg=${2:-none}: rc=$?"
            grep -E "^D=" "$log"
        done
    done
    ;;
decode-d256)
    # One launch each, after two warm-ups, at B=16 Hq=32 Hkv=8 and 4k keys: the old slow
    # table entry (32 keys, 4 warps, 3 stages, 0.09 TB/s), the committed one (8 warps,
    # 2 stages, 0.77) and off-Hopper's (16 keys, 4 warps, 2 stages, 0.76). The whole reports
    # come back under $OUT; the grep shows the stall lines.
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu \
        2> /dev/null | head -1)
    [ -n "$ncu" ] || { echo "no ncu on this machine: nothing to profile"; exit 0; }
    for cfg in "32 4 3" "32 8 2" "16 4 2"; do
        set -- $cfg
        timeout 150 "$ncu" --kernel-name regex:_split_kv_kernel --launch-skip 2 --launch-count 1 \
            --section LaunchStats --section Occupancy --section SchedulerStats \
            --section WarpStateStats --section MemoryWorkloadAnalysis --section SourceCounters \
            python plugins/triton/scripts/decode_perf.py --dtype fp32 --head-dim 256 \
            --configs "$1,$2,$3" --launch 3 \
            > "$OUT/ncu-d256-n$1-w$2-s$3.txt" 2>&1
        echo "== ncu D=256 fp32 $cfg: rc=$?"
        grep -iE "duration|registers per|achieved occupancy|warp cycles per issued|no eligible|stall|bank|mem busy" \
            "$OUT/ncu-d256-n$1-w$2-s$3.txt" | head -25
    done
    ;;
*)
    echo "usage: gpu_session.sh check|bench|fp32-tma|decode-d256" >&2; exit 2 ;;
esac
