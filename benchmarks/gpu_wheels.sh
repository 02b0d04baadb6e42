#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12, torch and CUDA but no package index (and so
# none of gpt2dist's other dependencies): run here, in the repository root's venv, then carry
# .whl/ there; benchmarks/gpu_check.sh installs from it. Versions match pyproject.toml and the
# versions this venv resolved.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# Published as source only; both build to pure-Python wheels (DeepSpeed's ops then JIT-compile on use).
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
ls -la .whl
