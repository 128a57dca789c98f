# First of two device calls for bench/gpu/issue3_gpu_rows.sh: the bundled GGUF (98 MB) is over
# one call's 64 MiB, so this call leaves its first half on the GPU machine's /tmp (carry:
# .carry/gg1, made with `split -b 49181216` of the GGUF) and the next call, made while the
# machine is still warm, brings the second half.
mkdir -p /tmp/gg && cp .carry/gg1/ggpart-aa /tmp/gg/ && ls -la /tmp/gg && nvidia-smi -L
