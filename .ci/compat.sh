#!/usr/bin/env bash
# One row of the version matrix (docs/build.md, "Supported versions"): a fresh virtual environment with the given
# Python and torch, the package built from this checkout (C++ CPU kernels; no CUDA sources), and the compact suite
# (python_tests/test_compatibility.py: import, opcheck of every op, torch.compile(fullgraph=True) with backward of
# every op and loss, gradients against the float64 references) plus the settings and autograd-mode tests.
#
#   bash .ci/compat.sh install PYTHON_VERSION TORCH_VERSION   # create build/compat-<py>-<torch> and install into it
#   bash .ci/compat.sh test    PYTHON_VERSION TORCH_VERSION   # build the package there, run the suite, remove the venv
#
# The two halves are separate so that CI can download the next row's torch while it builds and tests another.
set -euo pipefail
cd "$(dirname "$0")/.."
action=$1 py=$2 torch_version=$3
venv="build/compat-py$py-torch$torch_version"

find_python() {  # an interpreter of Python $1 that runs: a pyenv installation, else python$1 on PATH
  local roots=() exe
  command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
  roots+=("$HOME/.pyenv")
  for exe in $(for r in "${roots[@]}"; do ls -d "$r"/versions/"$1".*/bin/python 2>/dev/null | sort -V -r; done) \
             "$(command -v "python$1" || true)"; do
    if [ -n "$exe" ] && "$exe" -c "import sys; assert sys.version.startswith('$1.')" 2>/dev/null; then
      echo "$exe"; return 0
    fi
  done
  echo "[compat] no working Python $1 on this machine (pyenv or PATH)" >&2
  return 1
}

case "$action" in
  install)
    rm -rf "$venv"
    "$(find_python "$py")" -m venv "$venv"
    # The row's own torch: lift a site-wide pip cap on the torch release, if the machine has one.
    PIP_CONSTRAINT=/dev/null "$venv/bin/python" -m pip install -q "torch==$torch_version" numpy pytest ninja \
      "setuptools>=77" wheel
    echo "[compat] installed Python $py, torch $torch_version into $venv"
    ;;
  test)
    [ -x "$venv/bin/python" ] || { echo "[compat] $venv was not installed" >&2; exit 1; }
    start=$(date +%s)
    "$venv/bin/python" .ci/versions.py | sed 's/^\[versions\]/[compat]/'
    rm -rf "build/compat-src-$py-$torch_version" && mkdir -p "build/compat-src-$py-$torch_version"
    git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "build/compat-src-$py-$torch_version"  # tracked files only
    (cd "build/compat-src-$py-$torch_version" &&
      WKD_NO_CUDA=1 "../../$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e . >build.log 2>&1 ||
      { tail -40 build.log; exit 1; })
    status=0
    (cd "build/compat-src-$py-$torch_version" &&
      "../../$venv/bin/python" -m pytest -q -p no:cacheprovider python_tests/test_compatibility.py \
        python_tests/test_settings.py python_tests/test_autograd_modes.py) || status=$?
    echo "[compat] Python $py, torch $torch_version: $([ $status = 0 ] && echo passed || echo FAILED)" \
         "in $(( $(date +%s) - start )) s"
    rm -rf "$venv" "build/compat-src-$py-$torch_version"
    exit $status
    ;;
  *) echo "usage: bash .ci/compat.sh install|test PYTHON_VERSION TORCH_VERSION" >&2; exit 2 ;;
esac
