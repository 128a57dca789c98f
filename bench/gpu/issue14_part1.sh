# Issue 14, device call 1 of 3 (nvidia-h100-x1 or nvidia-h200; carry: .carry/gg1): leave the
# first half of the bundled GGUF on the GPU machine's /tmp (one call carries at most 64 MiB;
# the next call, made while the machine is warm, brings the second half) and report what the
# image has of the peer's dependencies.
mkdir -p /tmp/gg && cp .carry/gg1/ggpart-aa /tmp/gg/ && ls -la /tmp/gg && nvidia-smi -L
python3 -c "
import importlib.metadata as m
for n in ('torch','transformers','accelerate','datasets','pyarrow','pandas','xxhash','dill','multiprocess','fsspec','pydantic','gguf','triton'):
    try: print(n, m.version(n))
    except Exception as e: print(n, 'MISSING')
"
