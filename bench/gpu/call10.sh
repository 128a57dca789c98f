# device call 10 (one H100; carry .whl, .carry/gg1, .carry/peerwhl): every GPU test; the
# kernels' speed (issue 16); SparseGPT 50 % and 2:4 on 4 blocks of the 7B shape, ours vs
# llm-compressor (issue 18); offline rotations R1+R2 on the whole 7B shape, ours vs
# llm-compressor's SpinQuantModifier (issue 17). Leaves the bundled GGUF's first half in
# /tmp/gg for issue15_rows.sh (the next call, while the machine is warm).
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1
mkdir -p /tmp/gg && cp .carry/gg1/ggpart-aa /tmp/gg/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .carry/peerwhl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; date
timeout 130 python3 -m pytest -o addopts="" -m gpu -q -p no:cacheprovider -rfEs --continue-on-collection-errors --durations=15 plugins tests > $O/pytest_gpu.txt 2>&1; tail -8 $O/pytest_gpu.txt; date
timeout 170 python3 bench/gpu/kernels_speed.py --decode --out $O/kernels_speed_h100.json; date
timeout 75 $B rotate --out $O --name rotate-7b; date
timeout 80 $B prune --layers 4 --n-samples 32 --mask 2:4 --out $O --name prune-7b4-2of4; date
timeout 80 $B prune --layers 4 --n-samples 32 --mask 0.5 --out $O --name prune-7b4-50; date
timeout 60 $B evalspeed --windows 16 --repeats 3 --out $O --name evalspeed-7b-repeats; date
