# Issue 14, second GPU session, device call 2: the headline reruns the first session's fixes
# call for (TesseraQ from AWQ at W2/W3 g64: float targets of the unscaled block; AutoRound:
# the cycling sampler), W3 per-channel for every method but TesseraQ, the auto-round package
# at W2 g64 and W3 per-channel, one process per row group, each in its own session (few: a
# TesseraQ row is 75k small steps, its time grows with every job beside it); then
# wait up to T seconds (issue14_wait.sh). Carry: .whl, .carry/gg2, .carry/data, .carry/peerwhl
# (see issue14_env.sh). Many small kernels from many processes: start CUDA MPS where the image
# has it, so their kernels share the GPU instead of taking turns (left alone if it fails).
source bench/gpu/issue14_env.sh || exit
export OMP_NUM_THREADS=1 LLMCQ_BENCH_COMMIT=${COMMIT:?set COMMIT to the commit the .whl wheels were built from}
mps_on
job tq-w2 tesseraq w2g64
job tq-w3 tesseraq w3g64
job ar-a autoround w2g64,w3g64
job ar-b autoround w4g64,w3pc
job peer peer:autoround w2g64,w3pc --peer-args "--ar-device cuda --ar-amp true"
job base rtn,gptq,awq,awq+gptq,omniquant w3pc
date; sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
bash bench/gpu/issue14_wait.sh
