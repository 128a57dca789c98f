# Issue 14, second GPU session, last call: seconds per block and peak GPU memory of TesseraQ
# (llmc's schedule, one block) and AutoRound (two blocks) against the auto-round package (two
# blocks) in one process, Llama-2-7B shape with random weights, 128 x 2048 tokens, W2 g128 then
# W4 g128 (bench/gpu/rounding_speed.py). Alone on the GPU: the row jobs are finished (or
# stopped) first and MPS is shut. Needs the install of issue14_env.sh (same machine, warm).
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
pkill -f "[l]earned_rounding.py"; pkill -f "[l]lmcq run"; pkill -f "[r]un_peer.py"; sleep 2
[ -d /tmp/mps ] && CUDA_MPS_PIPE_DIRECTORY=/tmp/mps bash -c 'echo quit | nvidia-cuda-mps-control'
sleep 2; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
# W2 for all three first, then W4 for AutoRound and the package, TesseraQ's W4 last (its time
# per block hardly depends on the width); each part writes after every row, so a cut call
# keeps what finished
end=$(( $(date +%s) + ${T:-560} ))
left() { echo $(( end - $(date +%s) )); }
mkdir -p $OUT/w2 $OUT/w4 $OUT/w4tq
timeout $(left) python3 bench/gpu/rounding_speed.py --out $OUT/w2 --bits 2 ${ARGS:-}
[ $(left) -gt 30 ] && timeout $(left) python3 bench/gpu/rounding_speed.py --out $OUT/w4 --bits 4 --skip tesseraq ${ARGS:-}
[ $(left) -gt 30 ] && timeout $(left) python3 bench/gpu/rounding_speed.py --out $OUT/w4tq --bits 4 --skip autoround,peer ${ARGS:-}
ls -la $OUT/*
