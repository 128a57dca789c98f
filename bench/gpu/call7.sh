# seventh device call of issue 6 (nvidia-h200-x2): is the 2-GPU result as good as the 1-GPU
# one? 4 blocks of the 7B shape, output errors on held-out tokens from both, and the codes
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
B="python3 bench/gpu/bench.py"; O=$OUT; mkdir -p /tmp/k; date
timeout 150 $B dp --algo gptq --layers 4 --errors --keep /tmp/k --out $O --name dp-7b4-w1; date
timeout 150 torchrun --nproc-per-node 2 bench/gpu/bench.py dp --algo gptq --layers 4 --errors --keep /tmp/k --out $O --name dp-7b4-w2; date
timeout 60 $B dpcompare --keep /tmp/k --out $O --name dp-7b4-compare; date
