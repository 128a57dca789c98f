# eval19 device call 1 (carry .carry/gg1 .carry/e19a): first GGUF half, data, lm-eval wheel
mkdir -p /tmp/gg /tmp/data && cp .carry/gg1/ggpart-aa /tmp/gg/ && tar xzf .carry/e19a/data.tgz -C /tmp/data || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/e19a/*.whl || exit 1
nvidia-smi -L; ls /tmp/data /tmp/gg
python3 -c "
import importlib.metadata as m
for n in ('torch','transformers','accelerate','datasets','pyarrow','pandas','scipy','lxml','regex','pydantic','stevedore','gguf','jinja2','numpy','PyYAML','pluggy','tokenizers','safetensors','tqdm','dill','xxhash','multiprocess','huggingface-hub','fsspec','matplotlib','sacrebleu','portalocker','tabulate','colorama','more-itertools','sentencepiece'):
    try: print(n, m.version(n))
    except Exception: print(n, 'MISSING')
"
