#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, into .whl/ (ignored by git), for a device run to carry:
# fvcore and its pure-Python needs (../shared/device/prepare-wheels.sh), plus pydantic, which the
# suite validation needs and the GPU image does not have (Python 3.12, x86-64), plus the timm release
# this checkout's tests ran with: models.py reads timm's blocks, whose internals move between releases,
# and the GPU image's timm is whatever it was built with (it already has timm's own needs).
# Usage, from the project root:  bash benchmarks/device_wheels.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p "$(git rev-parse --git-dir)/info"  # prepare-wheels.sh appends to info/exclude, absent in some clones
bash ../shared/device/prepare-wheels.sh >/dev/null
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$(python3 -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  "timm==$(python3 -c 'import timm; print(timm.__version__)')" \
  annotated-types typing-inspection "typing-extensions==$(python3 -c 'import importlib.metadata as m; print(m.version("typing_extensions"))')"
ls -1 .whl
cat <<'MSG'

Device run: carry [".whl"]; the command
  bash benchmarks/gpu_session.sh check $OUT     (GPU tests, check_timing)
  bash benchmarks/gpu_session.sh suites $OUT    (the reference suites on the GPU)
installs them into /tmp/site itself. By hand: start the command with
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
MSG
