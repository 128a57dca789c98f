# fourth device call of issue 6: the Triton column sweep and pinned-buffer copies, then the
# full 7B GPTQ run and the 4-layer side by side with llm-compressor (carry .whl, .carry/gpu6)
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/gpu6/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/gpu6/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
B="python3 bench/gpu/bench.py"; O=$OUT; T="--tflops 769.7"; date
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs plugins/algorithms/gptq tests/test_transfer.py > $O/pytest_gpu.txt 2>&1; tail -8 $O/pytest_gpu.txt; date
timeout 100 $B sweep --out $O; date
timeout 150 $B ours --algo gptq --out $O --name ours-gptq-7b $T; date
timeout 130 $B side --algo gptq --layers 4 --out $O --name side-gptq-7b4 $T; date
