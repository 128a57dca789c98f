# eighth device call of issue 6 (one H100): every GPU test with the kernel and pinned copies,
# then AWQ W4 g128 on the full 7B shape (measured at full depth, not extrapolated)
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/gpu6/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/gpu6/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; T="--tflops 769.7"; date
timeout 130 python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs --continue-on-collection-errors > $O/pytest_gpu.txt 2>&1; tail -6 $O/pytest_gpu.txt; date
timeout 400 $B ours --algo awq --out $O --name ours-awq-7b $T; date
