# third device call of issue 6: the full 7B GPTQ run unprofiled, and 8 blocks of the 70B shape
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; T="--tflops 769.7"; date
timeout 175 $B ours --algo gptq --out $O --name ours-gptq-7b $T; date
timeout 135 $B memory --shape 70b --depths 8 --out $O --name memory-70b-d8 $T; date
