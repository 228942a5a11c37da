#!/usr/bin/env bash
# An installation without the C++ extension, as on a machine without a C++ compiler: a fresh venv (the CPU build of
# torch), WKD_NO_EXT=1, then the public API on the `torch` backend (docs/build.md, "What the build compiles").
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/noext-venv src=build/noext-src
rm -rf "$venv" "$src" && mkdir -p "$src"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==2.13.0" numpy scipy POT pytest "setuptools>=77" wheel
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$src"   # tracked files only
(cd "$src" && WKD_NO_EXT=1 "../../$venv/bin/python" -m pip install -v --no-build-isolation --no-deps -e . \
   >install.log 2>&1 || { tail -40 install.log; exit 1; })
grep -E "\[wkd_kernels\].*(without|extension)" "$src/install.log" | head -3 || true
(cd "$src" && "../../$venv/bin/python" - <<'PY'
import wkd_kernels as wk
info = wk.build_info()
print("[no-ext] build_info:", info)
assert not info["has_c_ext"], "WKD_NO_EXT=1 built the extension anyway"
assert info["backends"][0] == "torch", info["backends"]
assert wk.settings.current().backend == "auto"
PY
)
(cd "$src" && "../../$venv/bin/python" -m pytest -q -p no:cacheprovider python_tests/test_torch_backend.py \
   python_tests/test_compatibility.py python_tests/test_settings.py python_tests/test_autograd_modes.py \
   python_tests/test_losses_wkdl.py python_tests/test_losses_wkdf.py python_tests/test_gaussian_wasserstein.py)
rm -rf "$venv" "$src"
