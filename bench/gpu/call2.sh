# second device call of issue 6 (after the speed/memory fixes); every section writes $OUT/*.json
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/gpu6/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/gpu6/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; T="--tflops 769.7"; date
timeout 110 $B ours --algo gptq --out $O --name ours-gptq-7b $T; date
timeout 110 $B side --algo gptq --layers 4 --out $O --name side-gptq-7b4 $T; date
timeout 160 $B memory --shape 70b --depths 2,4,8 --out $O --name memory-70b $T; date
timeout 100 $B side --algo awq --layers 2 --profile --out $O --name side-awq-7b2 $T; date
timeout 60 $B evalspeed --windows 16 --out $O $T; date
timeout 45 python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs plugins/algorithms/gptq plugins/algorithms/awq tests > $O/pytest_gpu.txt 2>&1; tail -5 $O/pytest_gpu.txt; date
