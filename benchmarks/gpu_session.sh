#!/usr/bin/env bash
# What only a GPU can measure, prepared as device calls for a session that is lent one (../shared/gpu/README.md:
# no internet there, no ../shared, 10 minutes a call, 15 minutes a session). Every part writes under $OUT as it
# goes, so a call cut short still returns what it finished.
#
#   benchmarks/gpu_session.sh stage     here: .whl/ (constriction) and .gpu-data/shared/ (Kodak, the anchors)
#   then, with the device tool, carry [".whl", ".gpu-data"], timeout_s 590:
#   bash benchmarks/gpu_session.sh check    the test suite on CUDA, then encode_speed.py and decode_speed.py
#   bash benchmarks/gpu_session.sh rd       full Kodak, NIF at effort 5 on CUDA, 0.3 / 0.5 / 1.0 bpp, resuming
#                                           benchmarks/results/kodak/rd_nif-e5-cuda-s0.json (copy $OUT/rd/ back)
#
# NIF_GPU_BUDGET (seconds, default 540) bounds each call's parts together, leaving time to send $OUT back.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_session.sh stage|check|rd}
[[ $part == @(stage|check|rd) ]] || { echo "unknown part $part: stage, check or rd" >&2; exit 2; }
budget=${NIF_GPU_BUDGET:-540}
start=$SECONDS

left() {  # seconds of the call's budget still free, never under 10
    local s=$((budget - (SECONDS - start)))
    echo $((s > 10 ? s : 10))
}
cap() {  # left, at most $1
    local l; l=$(left)
    echo $((l < $1 ? l : $1))
}

if [[ $part == stage ]]; then
    set -e
    ls .whl/constriction-*.whl > /dev/null 2>&1 || ../shared/gpu/fetch-wheels.sh
    mkdir -p .gpu-data/shared/datasets .gpu-data/shared/anchors
    cp -r ../shared/datasets/kodak .gpu-data/shared/datasets/
    cp ../shared/anchors/kodak_published.json .gpu-data/shared/anchors/
    du -sh .whl .gpu-data
    exit 0
fi

: "${OUT:?run this part on the device machine, where \$OUT is set}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
# The wheel maps kernels/ to pillow_nif.kernels (pyproject.toml); this throwaway copy of the tree gets a link instead
# of an install, so that the source tree is what runs.
[[ -e src/pillow_nif/kernels ]] || ln -s ../../kernels src/pillow_nif/kernels
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PILLOW_NIF_SHARED=$PWD/.gpu-data/shared
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton, PIL, numpy, constriction; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'pillow', PIL.__version__, 'numpy', numpy.__version__)"
    nproc
    git log -1 --format='commit %H %s' 2>/dev/null
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

case $part in
check)
    # The whole suite with CUDA present: the kernels' tests then run compiled on the GPU, not in the interpreter,
    # and every Image.open decodes on CUDA.
    timeout "$(cap 240)" python3 -m pytest -q -p no:cacheprovider --durations=10 > "$OUT/pytest.txt" 2>&1
    echo "pytest: exit $?, $(tail -1 "$OUT/pytest.txt")"
    timeout "$(cap 90)" python3 benchmarks/decode_speed.py --no-cpu --out "$OUT/decode_speed.json" \
        > "$OUT/decode_speed.log" 2>&1
    echo "decode_speed: exit $?"
    # Issue 5's figures, most wanted first (the JSON is rewritten after each section): whole-call encodes of
    # 768x512 at 0.3 and 1.0 bpp, the step of each path, 64 images of 256x256 at once against one at a time
    # (timed on 8: 64 single encodes would outlast the call), then the batch on the fused Triton layer.
    timeout "$(left)" python3 benchmarks/encode_speed.py --device cuda --batch-n 64 --single-n 8 --skip cpu \
        --out "$OUT/encode_speed.json" > "$OUT/encode_speed.log" 2>&1
    echo "encode_speed: exit $?"
    timeout "$(left)" python3 benchmarks/encode_speed.py --device cuda --batch-n 64 --single-n 0 --batch-fused \
        --skip kodak,step,forward,cpu --out "$OUT/encode_speed_fused.json" > "$OUT/encode_speed_fused.log" 2>&1
    echo "encode_speed --batch-fused: exit $?"
    ;;
rd)
    mkdir -p "$OUT/rd"
    cp benchmarks/results/kodak/rd_nif-e5-cuda-s0.json "$OUT/rd/" 2>/dev/null  # resume earlier sessions' records
    # The classical codecs' records are in the file already (encoded on a CPU): listed so that the tables have them.
    timeout "$(left)" python3 benchmarks/rd.py --dataset kodak --bpp 0.3 0.5 1.0 --codecs nif,jpeg,webp,avif,jxl \
        --effort 5 --device cuda --out "$OUT/rd" --name rd_nif-e5-cuda-s0 > "$OUT/rd/log.txt" 2>&1
    echo "rd: exit $?"
    tr '\r' '\n' < "$OUT/rd/log.txt" | tail -5
    ;;
esac
