#!/usr/bin/env bash
# The test suite under the lent GPU machine's torch (2.11), on this CPU, in a virtual environment of
# its own: the GPU machine cannot install anything, so code that needs a newer torch than it has is
# caught here, before device time is spent. torchvision is the release made for that torch (0.N+15).
#
#   bash benchmarks/device_torch.sh [TORCH_VERSION] [pytest args...]     # default 2.11.0, all tests
set -euo pipefail
version=${1:-2.11.0}
shift || true
minor=$(echo "$version" | cut -d. -f2)
venv=${VENV:-/tmp/attnbench-torch-$version}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  printf 'torch==%s\ntorchvision==0.%s.*\n' "$version" "$((minor + 15))" > "$venv/constraints.txt"
  PIP_ROOT_USER_ACTION=ignore "$venv/bin/pip" install -q -c "$venv/constraints.txt" -e ".[test]"
fi
"$venv/bin/python" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
