#!/usr/bin/env bash
# A side virtual environment with Kauldron, for benchmarks/kauldron_worker.py.
#
# Kauldron is never a dependency of kckpt: it lives in its own venv, with the
# same jax, jaxlib, orbax-checkpoint, tensorstore and numpy as the main .venv
# (so both checkpointers write through the same Orbax and TensorStore code).
#
#   bash benchmarks/kauldron_venv.sh [VENV]      # VENV defaults to .venv-kauldron
#   PYTHON=python3.12 bash benchmarks/kauldron_venv.sh
#
# Run it from the repository root. The last line it prints is the venv's python.
#
# Why `--no-deps`: kauldron declares ~30 dependencies (tensorflow, tensorflow_datasets,
# grain, clu, xmanager, opencv-python, scikit-image, ...) for its trainer, data
# pipelines and launchers. `from kauldron import kd` is lazy, and `kd.ckpts` (the
# Checkpointer) imports only the packages listed in CKPT_DEPS below, so we install
# kauldron without its dependencies and add those. The checkpoint code path is the
# same as in a full install (`pip install kauldron`, which brings TensorFlow: not tried here).
set -euo pipefail

VENV="${1:-.venv-kauldron}"
PYTHON="${PYTHON:-python3}"
MAIN_PY=".venv/bin/python"

# Kauldron 1.4.3 and later require Python >= 3.12; on Python 3.11 pip picks 1.4.2,
# the newest 1.4.x that installs there.
KAULDRON_SPEC="kauldron>=1.4,<1.5"

# What `from kauldron import kd; kd.ckpts.Checkpointer` imports (found by trial on
# kauldron 1.4.2): etils' extras, absl, flax (kauldron.checkpoints.partial_loader),
# ml_collections and lark (kauldron.kontext), immutabledict and typeguard
# (kauldron.konfig / kauldron.typing). None pinned: pip picks versions that fit
# the pinned jax.
CKPT_DEPS=(
  "etils[edc,enp,epath,epy,etree]"
  absl-py
  flax
  ml_collections
  lark
  immutabledict
  "typeguard>=4.4.1"
  typing_extensions
)

# The packages whose versions must match the main venv: jax and jaxlib (the
# arrays), orbax-checkpoint (the checkpointing), tensorstore (Orbax's I/O: its
# version changes write and read speed), numpy.
SAME_AS_MAIN=(jax jaxlib orbax-checkpoint tensorstore numpy)
PINS=()
if [[ -x "$MAIN_PY" ]]; then
  while read -r pin; do
    PINS+=("$pin")
  done < <("$MAIN_PY" - "${SAME_AS_MAIN[@]}" <<'EOF'
import importlib.metadata
import sys

for name in sys.argv[1:]:
  try:
    print(f"{name}=={importlib.metadata.version(name)}")
  except importlib.metadata.PackageNotFoundError:
    pass
EOF
)
  echo "Pinned to the main venv: ${PINS[*]}" >&2
else
  echo "No $MAIN_PY here: installing the latest jax, orbax-checkpoint and numpy (the versions may differ from kckpt's)." >&2
  PINS=(jax orbax-checkpoint numpy)
fi

start=$(date +%s)
"$PYTHON" -m venv "$VENV"
# Keep the venv out of git without touching the project's .gitignore.
echo "*" >"$VENV/.gitignore"
"$VENV/bin/python" -m pip install -q --no-deps "$KAULDRON_SPEC"
# pip then reports "kauldron 1.4.x requires altair, which is not installed" and so
# on (the dependencies left out on purpose) and still exits 0.
"$VENV/bin/python" -m pip install -q "${PINS[@]}" "${CKPT_DEPS[@]}"

# Fails here, naming the missing module, if a newer kauldron imports more.
JAX_PLATFORMS=cpu "$VENV/bin/python" -c "
import importlib.metadata
from kauldron import kd
assert kd.ckpts.Checkpointer
import flax.struct
print(' '.join(f'{p}=={importlib.metadata.version(p)}' for p in ('kauldron', 'jax', 'orbax-checkpoint', 'tensorstore', 'numpy', 'flax')))
" >&2
echo "Installed in $(($(date +%s) - start)) s; $(du -sh "$VENV" | cut -f1) on disk." >&2
cd "$VENV" && echo "$PWD/bin/python"
