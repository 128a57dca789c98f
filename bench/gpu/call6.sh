# sixth device call of issue 6 (nvidia-h200-x2): data-parallel GPTQ on the 7B shape, one GPU
# vs two (torchrun, NCCL), then the two results compared; NVLink multicast stays off
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
python3 -c 'import torch; print(torch.cuda.device_count(), torch.cuda.get_device_name(0))'
B="python3 bench/gpu/bench.py"; O=$OUT; mkdir -p /tmp/k; date
timeout 200 $B dp --algo gptq --keep /tmp/k --out $O --name dp-7b-w1; date
timeout 200 torchrun --nproc-per-node 2 bench/gpu/bench.py dp --algo gptq --keep /tmp/k --out $O --name dp-7b-w2; date
timeout 60 $B dpcompare --keep /tmp/k --out $O --name dp-7b-compare; date
