# Issue 14, device call 2 of a third session: the rows still missing after the second
# (TesseraQ from AWQ and alone at W4 g64 and W3 per channel, OmniQuant at W4 g64), one
# process per row, each in its own session; then wait up to T seconds (issue14_wait.sh).
# Four TesseraQ rows side by side take about 20 minutes (each 75k small steps, launch-bound):
# run this before issue14_speed.sh only when the session can hold both. Carry: .whl,
# .carry/gg2, .carry/data, .carry/peerwhl (see issue14_env.sh).
source bench/gpu/issue14_env.sh || exit
export OMP_NUM_THREADS=1 LLMCQ_BENCH_COMMIT=${COMMIT:?set COMMIT to the commit the .whl wheels were built from}
mps_on
job tq-w4 tesseraq w4g64
job tq-pc tesseraq w3pc
job tqn-w4 tesseraq-noawq w4g64
job tqn-pc tesseraq-noawq w3pc
job omni-w4 omniquant w4g64
date; sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
bash bench/gpu/issue14_wait.sh
