#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment. Keeps a torch that is already installed; otherwise
# installs torch==2.14.1 + torchvision==0.29.1, which these machines serve from local disk (no multi-GB download).
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch, torchvision" 2>/dev/null; then
    echo "setup: keeping the installed torch $("$python" -c 'import torch; print(torch.__version__)')"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: torch is installed but torchvision is not; install the torchvision that matches your torch" >&2
    exit 1
  fi
  echo "setup: installing torch==2.14.1 torchvision==0.29.1"
  "${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi
"${pip[@]}" -e ".[serve,test,gallery]"
echo "setup: ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
