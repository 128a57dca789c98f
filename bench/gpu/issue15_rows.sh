# Issue 15 on the GPU (after issue14_part1.sh has left the GGUF's first half): every row of
# bench/slimllm.py on the bundled model, 16 windows and the whole test set (--full), in eight
# processes under MPS, each in its own session; then wait up to T seconds (issue14_wait.sh
# with PATTERN). Carry: .whl, .carry/gg2, .carry/data, .carry/peerwhl (see issue14_env.sh).
# Merge here: .venv/bin/python bench/slimllm.py --merge <dir>/parts/*.json
source bench/gpu/issue14_env.sh || exit
export OMP_NUM_THREADS=1 LLMCQ_BENCH_COMMIT=${COMMIT:?set COMMIT to the commit the .whl wheels were built from}
mps_on
sjob() {  # name methods settings
  (cd /tmp/lr/bench && setsid nohup python3 slimllm.py --methods "$2" --only "$3" --full \
    --out /tmp/lr/parts/$1.json > /tmp/lr/$1.log 2>&1 < /dev/null &)
}
sjob gptq gptq,gptq-noact w2g64,w3g64,w4g64
sjob gptq-b gptq,gptq-noact b2.5g64,b3.25g64
sjob slim slimllm w2g64,w3g64,w4g64
sjob slim-b slimllm,slimllm-act b2.5g64,b3.25g64
sjob slim-act slimllm-act w2g64,w3g64,w4g64
sjob slim-lam slimllm-l2,slimllm-l4,slimllm-l8 w2g64,w3g64
sjob slim-abl slimllm-k0,slimllm-nosqc w2g64,w3g64
sjob lwc omniquant,slimllm-plus w2g64,w3g64
date; sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
PATTERN="[s]limllm.py" bash bench/gpu/issue14_wait.sh
