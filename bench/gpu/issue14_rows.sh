# Issue 14, first GPU session, device call 2 of 3: every learned-rounding row of bench/learned_rounding.py, side by
# side on one GPU (one process per row group), started in their own sessions so they outlive
# this call; the call waits up to T seconds and returns what has finished. Carry: .whl (bash
# scripts/device_wheels.sh), .carry/gg2 (second GGUF half + sha256), .carry/data (wikitext2),
# .carry/peerwhl (auto-round 0.15.1 and the dependencies the image lacks).
source bench/gpu/issue14_env.sh || exit
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
bash bench/gpu/issue14_wait.sh
