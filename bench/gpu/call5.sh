# fifth device call of issue 6: kernel launch shapes, a profiled 7B GPTQ run (where the time
# goes now), and the side by side on asymmetric grids (where both tools' grids coincide)
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/gpu6/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/gpu6/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; T="--tflops 769.7"; date
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs plugins/algorithms/gptq tests/test_transfer.py > $O/pytest_gpu.txt 2>&1; tail -4 $O/pytest_gpu.txt; date
timeout 100 $B sweep --out $O; date
timeout 150 $B ours --algo gptq --profile --out $O --name ours-gptq-7b-profiled $T; date
timeout 130 $B side --asym --algo gptq --layers 4 --out $O --name side-gptq-7b4-asym $T 2>&1 | grep -v "it/s\|METRIC\|INFO"; date
