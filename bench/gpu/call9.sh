# first device call of issue 13 (one H200): every GPU test after the core contracts
# (capabilities, richer records, masks, llmcq.recon, data-parallel observers), including the
# second-wave CUDA recipes of tests/test_algorithms_cuda.py (OmniQuant LET + activation STE
# through core's harness, static activation ranges, a 2:4 mask kept by GPTQ's sweep).
# carry: [".whl", ".carry/data"]; .whl from `bash scripts/device_wheels.sh`
exec > >(tee $OUT/log.txt) 2>&1; export PYTHONUNBUFFERED=1 LLMCQ_SHARED_DATA=$PWD/.carry/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; date
timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs --junitxml=$OUT/pytest_gpu.xml > $OUT/pytest_gpu.txt 2>&1; tail -25 $OUT/pytest_gpu.txt; date
