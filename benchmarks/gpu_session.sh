#!/usr/bin/env bash
# What only a GPU can measure, prepared as device calls for a session that is lent one (../shared/gpu/README.md:
# no internet there, no ../shared, 10 minutes a call, 15 minutes a session). Every part writes under $OUT as it
# goes, so a call cut short still returns what it finished.
#
#   benchmarks/gpu_session.sh stage     here: .whl/ (constriction, pytorch-msssim) and .gpu-data/shared/ (Kodak,
#                                       the anchors)
#   then, with the device tool, carry [".whl", ".gpu-data"], timeout_s 590:
#   bash benchmarks/gpu_session.sh check    the GPU tests (kernels, decoding, fitting, CUDA graphs), decode_speed.py,
#                                           encode_speed.py's step and tiles sections, then its kodak section with
#                                           and without the fused training pass (session 45 on an H200: tests
#                                           ~100 s, decode ~20 s, the two encodes 50 s and 62 s, steps ~15 s,
#                                           before the steps replayed CUDA graphs), then the batch part if 150 s
#                                           are left
#   bash benchmarks/gpu_session.sh batch    encode_speed.py's batch section alone: 64 crops at once against one at a
#                                           time (after the check's 280 s it had not finished in the 245 s left)
#   bash benchmarks/gpu_session.sh rd       full Kodak, NIF at effort 5 on CUDA, 0.3 / 0.5 / 1.0 bpp, resuming
#                                           benchmarks/results/kodak/rd_nif-e5-cuda-s0.json (copy $OUT/rd/ back):
#                                           NIF_RD_JOBS (default 8) encodes at once, two cores each, since one
#                                           encode leaves the GPU mostly idle and its host stages need the CPU
#                                           (50-60 s an encode on an H200 in session 45, eager steps, one at a time);
#                                           or NIF_RD_BATCH=N: up to N images a call of encode_many (one process,
#                                           like-sized images fitted as one stacked network; unmeasured on a GPU,
#                                           so only once check's batch part has shown that it runs)
#
# NIF_GPU_BUDGET (seconds, default 540) bounds each call's parts together, leaving time to send $OUT back.
# A machine starts in ~30 s; a session has 15 minutes of device time, so check and one other part fit one session.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: gpu_session.sh stage|check|batch|rd}
[[ $part == @(stage|check|batch|rd) ]] || { echo "unknown part $part: stage, check, batch or rd" >&2; exit 2; }
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
    # constriction for the codec; pytorch-msssim for rd.py's MS-SSIM (the device's image has neither)
    ls .whl/constriction-*.whl .whl/pytorch_msssim-*.whl > /dev/null 2>&1 ||
        ../shared/gpu/fetch-wheels.sh pytorch-msssim
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

batch() {
    # 64 images of 256x256 at once against one at a time (timed on 2: single encodes are ~8000 steps each).
    # The fused Triton layer is left out: its stacked step was 2.2x slower than torch's on an H200.
    timeout "$(left)" python3 benchmarks/encode_speed.py --device cuda --batch-n 64 --single-n 2 \
        --skip kodak,step,tiles,forward,cpu --out "$OUT/encode_batch.json" > "$OUT/encode_batch.log" 2>&1
    echo "encode_speed batch: exit $?"
}

case $part in
check)
    # The kernels' tests run compiled on the GPU, not in the interpreter; decoding and fitting tests run on CUDA.
    timeout "$(cap 120)" python3 -m pytest -q -p no:cacheprovider --durations=10 tests/test_kernels_sine_layer.py \
        tests/test_kernels_nif_decode.py tests/test_kernels_nif_train.py tests/test_render.py tests/test_plugin.py \
        tests/test_fit.py \
        tests/test_stepgraph.py tests/test_postfilter.py::test_the_least_squares_sums_on_torch_tensors_are_numpys \
        tests/test_postfilter.py::test_on_device_moves_the_arrays_to_cuda_only \
        > "$OUT/pytest.txt" 2>&1
    echo "pytest: exit $?, $(tail -1 "$OUT/pytest.txt")"
    timeout "$(cap 60)" python3 benchmarks/decode_speed.py --no-cpu --models 0.3bpp,1.0bpp \
        --out "$OUT/decode_speed.json" > "$OUT/decode_speed.log" 2>&1
    echo "decode_speed: exit $?"
    # Issue 5's figures: first the step of each path (torch, the stacked torch step, the fused Triton layer, CUDA
    # graphs, the fused training pass eager and replayed) and the fused pass's tile shapes, then whole-call encodes
    # of 768x512 at 0.3 and 1.0 bpp with the default step and with the fused training pass (the JSON is rewritten
    # after each section).
    timeout "$(cap 120)" python3 benchmarks/encode_speed.py --device cuda --skip kodak,batch,forward,cpu \
        --out "$OUT/encode_step.json" > "$OUT/encode_step.log" 2>&1
    echo "encode_speed step: exit $?"
    timeout "$(left)" python3 benchmarks/encode_speed.py --device cuda --kodak-fused \
        --skip step,tiles,batch,forward,cpu --out "$OUT/encode_speed.json" > "$OUT/encode_speed.log" 2>&1
    echo "encode_speed kodak: exit $?"
    # The steps replay CUDA graphs since session 46, so the encodes may leave time for the batch part here.
    if (( $(left) >= 150 )); then batch; fi
    ;;
batch)
    batch
    ;;
rd)
    mkdir -p "$OUT/rd"
    # resume earlier sessions' records (a batch run has its own file, seeded with the classical codecs' records)
    cp benchmarks/results/kodak/rd_nif-e5-cuda-s0.json "$OUT/rd/rd_nif-e5-cuda-s0${NIF_RD_BATCH:+-batch}.json"
    [[ -z ${NIF_RD_BATCH:-} ]] || cp benchmarks/results/kodak/rd_nif-e5-cuda-s0-batch.json "$OUT/rd/" 2>/dev/null
    # The classical codecs' records are in the file already (encoded on a CPU): listed so that the tables have them.
    timeout "$(left)" python3 benchmarks/rd.py --dataset kodak --bpp 0.3 0.5 1.0 --codecs nif,jpeg,webp,avif,jxl \
        --effort 5 --device cuda --jobs "${NIF_RD_JOBS:-8}" --batch "${NIF_RD_BATCH:-0}" --out "$OUT/rd" \
        --name "rd_nif-e5-cuda-s0${NIF_RD_BATCH:+-batch}" > "$OUT/rd/log.txt" 2>&1
    echo "rd: exit $?"
    tr '\r' '\n' < "$OUT/rd/log.txt" | tail -5
    ;;
esac
