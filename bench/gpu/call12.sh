# device call 12 (one H100; carry .whl, .carry/peerwhl): the shortest useful call: the
# kernels' GPU tests and the weight-activation kernels' speed (issue 16), then the offline
# rotations' speed on the whole 7B shape (issue 17).
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; date; nvidia-smi -L
timeout 60 python3 -m pytest -o addopts="" -m gpu -q -p no:cacheprovider -rfEs plugins/kernels > $O/pytest_gpu_kernels.txt 2>&1; tail -5 $O/pytest_gpu_kernels.txt; date
timeout 80 python3 bench/gpu/kernels_speed.py --wa-only --out $O/kernels_wa.json; date
timeout 70 $B rotate --out $O --name rotate-7b; date
