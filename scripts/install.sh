#!/usr/bin/env bash
# Installs everything the engine needs into ./.venv:
#   1. Debian headers Pillow-SIMD builds against (when apt-get is available and we are root);
#   2. the engine and its dependencies (pip, editable);
#   3. Pillow-SIMD, last and with --no-deps, because any package that depends on `pillow`
#      would otherwise reinstall stock Pillow into the same PIL/ folder.
# If the Pillow-SIMD build fails, stock Pillow is installed instead, with a warning.
# The outcome is written to .venv/pillow-build.txt: its first line "simd" or "fallback: <reason>",
# then "codecs: ..." (what the build reads) and "missing: ..." (what it cannot, and why).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PILLOW_SIMD_VERSION=${PILLOW_SIMD_VERSION:-12.1.1.post0}
EXTRAS=${ENGINE_EXTRAS:-test,bench}

log() { echo "[install] $*" >&2; }

# LittleCMS (LAB TIFFs, ICC), OpenJPEG (JPEG 2000) and FreeType are built in. libavif is not:
# Pillow 12 needs libavif >= 1.0 and Debian 12 has 0.11, so AVIF comes from pillow-avif-plugin
# (a wheel with its own libavif, in pyproject.toml) unless the build has it.
HEADERS="libjpeg62-turbo-dev zlib1g-dev libpng-dev libwebp-dev libtiff-dev liblcms2-dev libopenjp2-7-dev libfreetype-dev"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # shellcheck disable=SC2086
  if ! dpkg -s $HEADERS >/dev/null 2>&1; then
    log "installing Debian image headers for the Pillow-SIMD build"
    apt-get update -qq >/dev/null
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $HEADERS >/dev/null
  fi
else
  log "not root or no apt-get: assuming image headers (libjpeg, zlib, png, webp, tiff, lcms2, openjp2) are present"
fi
# The codecs the build must have: the base ones always, the others when their headers are here,
# so an existing build without them is rebuilt once they are.
WANT="jpg zlib webp libtiff"
[ -e /usr/include/lcms2.h ] && WANT="$WANT littlecms2"
compgen -G "/usr/include/openjpeg-2.*/openjpeg.h" >/dev/null && WANT="$WANT jpg_2000"

# Debian's chromium: the headless browser tests/test_inspect_browser.py renders the inspect report in
# (skipped without it). ENGINE_NO_CHROMIUM=1 leaves it out; a failed install only warns.
if [ -z "${ENGINE_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  log "installing chromium (headless browser for the report tests)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || log "WARNING: chromium could not be installed; the browser tests will be skipped"
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=".venv/.deps-$( (cat pyproject.toml; echo "$EXTRAS") | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ -f .venv/pillow-build.txt ]; then
  log "dependencies up to date ($STAMP)"
else
  $VPY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  log "installing the engine and its dependencies"
  $VPY -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
  $VPY -c "import engine, ray, datasets, pyarrow, polars, jsonschema_rs" \
    || { log "dependency install failed"; exit 1; }
  rm -f .venv/.deps-* .venv/pillow-build.txt
fi

simd_ok() { WANT="$WANT" $VPY - <<'PY'
import importlib.metadata as md, os, PIL, pathlib
dist = md.distribution("pillow-simd")
files = {str(dist.locate_file(f)) for f in dist.files or []}
assert str(pathlib.Path(PIL.__file__)) in files, PIL.__file__
# A later `pip install` of a package that needs `pillow` writes stock Pillow over the same files.
assert PIL.__version__ == dist.version, f"PIL is {PIL.__version__}, not pillow-simd {dist.version}"
try:
    raise AssertionError(f"stock pillow {md.version('pillow')} is installed beside pillow-simd")
except md.PackageNotFoundError:
    pass
from PIL import features
missing = [f for f in os.environ["WANT"].split() if not features.check(f)]
assert not missing, f"built without {missing}"
PY
}

# Lines 2-3 of pillow-build.txt: what the installed Pillow decodes, and what it cannot.
record_codecs() { $VPY - >>.venv/pillow-build.txt <<'PY'
from engine.versions import codecs
have, missing = codecs()
print("codecs:", " ".join(have))
print("missing:", "; ".join(f"{k} ({v})" for k, v in missing.items()) or "none")
PY
}

BUILD_LOG=.venv/pillow-simd-build.log  # per checkout: two checkouts may install at once
if simd_ok >/dev/null 2>&1; then
  log "Pillow-SIMD already installed"
  echo simd > .venv/pillow-build.txt
else
  log "building Pillow-SIMD ${PILLOW_SIMD_VERSION} with ${WANT} (about a minute)"
  $VPY -m pip uninstall -y -q pillow pillow-simd >/dev/null 2>&1 || true
  CFLAGS_SIMD="-mavx2"
  grep -qw avx2 /proc/cpuinfo 2>/dev/null || CFLAGS_SIMD="-msse4"
  # --no-cache-dir: a wheel cached from a build without the codecs' headers would be reused
  if CC="cc ${CFLAGS_SIMD}" $VPY -m pip install -q --no-deps --no-cache-dir --no-binary pillow-simd \
        "pillow-simd==${PILLOW_SIMD_VERSION}" >"$BUILD_LOG" 2>&1 && simd_ok >>"$BUILD_LOG" 2>&1; then
    echo simd > .venv/pillow-build.txt
    log "Pillow-SIMD installed"
  else
    reason=$(grep -m1 -E "AssertionError|error" "$BUILD_LOG" || echo "build failed")
    log "WARNING: Pillow-SIMD build failed ($reason); falling back to stock Pillow (about 1.5x slower resizing)"
    $VPY -m pip uninstall -y -q pillow-simd >/dev/null 2>&1 || true
    $VPY -m pip install -q pillow
    echo "fallback: $reason" > .venv/pillow-build.txt
  fi
fi
record_codecs
touch "$STAMP"
log "done: $($VPY -c 'import PIL; print("Pillow", PIL.__version__)') ($(tr "\n" " " <.venv/pillow-build.txt))"
