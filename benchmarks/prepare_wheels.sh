#!/usr/bin/env bash
# Before running the GPU suite on a machine without network: put the wheels it installs first into .whl/
# (git-ignored), for that machine's Python (3.12 unless PYTHON_VERSION says otherwise): bitsandbytes, which the
# machine lacks, peft 0.21.2 (pure Python; a peft older than 0.18 does not import under transformers 5), and
# accelerate 1.15.0, which that peft imports from (pure Python).
# Then carry .whl/ with the checkout and run `OUT=DIR bash benchmarks/gpu_suite.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl  # an older wheel beside the new one would make pip refuse both there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "bitsandbytes==0.50.2" "peft==0.21.2" "accelerate==1.15.0"
ls -la .whl
