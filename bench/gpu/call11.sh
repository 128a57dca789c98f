# device call 11 (one H100; carry .whl, .carry/peerwhl): call10.sh reordered for a short
# budget, most wanted first: the kernels' speed (issue 16), SparseGPT 2:4 on 4 blocks of the
# 7B shape vs llm-compressor (issue 18), offline R1+R2 on the whole 7B shape vs
# SpinQuantModifier (issue 17), the kernels' GPU tests, evaluation speed (issue 19), 50 %.
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; date; nvidia-smi -L
timeout 150 python3 bench/gpu/kernels_speed.py --out $O/kernels_speed.json; date
timeout 80 $B prune --layers 4 --n-samples 32 --mask 2:4 --out $O --name prune-7b4-2of4; date
timeout 75 $B rotate --out $O --name rotate-7b; date
timeout 70 python3 -m pytest -o addopts="" -m gpu -q -p no:cacheprovider -rfEs plugins/kernels > $O/pytest_gpu_kernels.txt 2>&1; tail -5 $O/pytest_gpu_kernels.txt; date
timeout 60 $B evalspeed --windows 16 --repeats 3 --out $O --name evalspeed-7b-repeats; date
timeout 80 $B prune --layers 4 --n-samples 32 --mask 0.5 --out $O --name prune-7b4-50; date
