#!/usr/bin/env bash
# Set up .venv on a fresh Debian machine: the Debian build packages (when root), the Python
# dependencies with the pins that matter here, and pillow-simd in place of Pillow.
# Idempotent: a second run only redoes what is missing. Called by `make` (see Makefile).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PILLOW_SIMD_VERSION=12.1.1.post0
# the metadata-only "pillow" distribution that stands for pillow-simd (see make_pillow_shim.py)
PILLOW_SHIM_VERSION=12.1.1+simd
# libjpeg-turbo/zlib/png/freetype headers for the pillow-simd build; the WordNet 3.0 database;
# headless Chromium and a font for the UI tests (tests/test_ui.py) and the README's screenshots
APT_PACKAGES="libjpeg62-turbo-dev zlib1g-dev libpng-dev libfreetype-dev wordnet-base wordnet-sense-index chromium fonts-dejavu-core"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

# pip prints one "Location ... is ignored" warning per package for this machine's extra
# (file://) indexes; they say nothing about our install, so they are filtered out.
pip_quiet() {
    { "$VENV/bin/pip" --disable-pip-version-check "$@" 2>&1; } \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

install_debian_packages() {
    local missing=() p
    for p in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        log "WARNING: Debian packages missing (${missing[*]}) and not root: the pillow-simd build may fail,"
        log "         the word-vector stage needs WordNet (/usr/share/wordnet, package wordnet-base),"
        log "         and the UI tests need headless Chromium (package chromium)"
    fi
}

create_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
            || { log "ERROR: Python >= 3.11 needed, $PYTHON is $("$PYTHON" --version 2>&1)"; exit 1; }
        log "creating $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
}

install_project() {
    log "installing imagesmith and its dependencies (torch from local disk: ~1 min)"
    pip_quiet install -q -e '.[test]'
}

simd_active() {
    "$VENV/bin/python" - "$PILLOW_SIMD_VERSION" "$PILLOW_SHIM_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
import PIL
simd, shim = sys.argv[1], sys.argv[2]
ok = PIL.__version__ == simd and md.version("pillow-simd") == simd and md.version("pillow") == shim
sys.exit(0 if ok else 1)
EOF
}

write_imaging_record() {  # $1 backend, $2 cc, $3 note
    "$VENV/bin/python" - "$@" <<'EOF'
import json, sys, pathlib
backend, cc, note = sys.argv[1:4]
path = pathlib.Path(sys.prefix) / "imagesmith-imaging.json"
path.write_text(json.dumps({"backend": backend, "cc": cc, "note": note}, indent=1) + "\n")
EOF
}

install_pillow_simd() {
    if simd_active; then
        return 0
    fi
    local wheelhouse="$VENV/wheelhouse" cc="cc" whl
    grep -qw avx2 /proc/cpuinfo 2>/dev/null && cc="cc -mavx2"
    whl=$(ls "$wheelhouse"/pillow_simd-"$PILLOW_SIMD_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
        log "building pillow-simd $PILLOW_SIMD_VERSION from source with CC='$cc' (~1-3 min)"
        if ! command -v cc >/dev/null || ! CC="$cc" pip_quiet wheel -q --no-deps --no-binary :all: \
                -w "$wheelhouse" "pillow-simd==$PILLOW_SIMD_VERSION"; then
            log "WARNING: pillow-simd could not be built; staying on plain Pillow (resizing ~2x slower)."
            log "         'imagesmith doctor' reports the active imaging backend."
            pip_quiet install -q "pillow"
            write_imaging_record pillow "" "pillow-simd build failed; plain Pillow fallback"
            return 0
        fi
        whl=$(ls "$wheelhouse"/pillow_simd-"$PILLOW_SIMD_VERSION"-*.whl | head -n 1)
    fi
    log "replacing Pillow with pillow-simd ($whl)"
    # Pillow and pillow-simd both own the PIL/ package: remove Pillow first, then install
    # pillow-simd over a clean PIL/, then the shim that satisfies "pillow" requirements.
    pip_quiet uninstall -q -y pillow pillow-simd
    pip_quiet install -q --no-deps --force-reinstall "$whl"
    "$VENV/bin/python" scripts/make_pillow_shim.py "$PILLOW_SHIM_VERSION" "pillow-simd==$PILLOW_SIMD_VERSION" "$wheelhouse"
    pip_quiet install -q --no-deps --force-reinstall "$wheelhouse"/pillow-"$PILLOW_SHIM_VERSION"-py3-none-any.whl
    simd_active || { log "ERROR: pillow-simd installed but PIL does not report it"; exit 1; }
    write_imaging_record pillow-simd "$cc" "built from source"
}

# The bundled sample uses real photos from Debian's darknet package (a dog, an eagle, a giraffe,
# horses, a beach; Munch's "The Scream" for style transfer). Only its data is needed, not the
# program and its OpenCV dependencies: the .deb is downloaded and just those files extracted.
install_darknet_photos() {
    local target="$VENV/share/darknet" tmp deb
    if [ -f /usr/share/darknet/data/dog.jpg ] || [ -f "$target/data/dog.jpg" ]; then
        return 0
    fi
    tmp=$(mktemp -d)
    if ! (cd "$tmp" && { apt-get download -qq darknet 2>/dev/null \
            || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get download -qq darknet; }; }); then
        log "ERROR: could not download Debian's darknet package (its photos are part of the bundled sample);"
        log "       install it (apt-get install darknet) or set IMAGESMITH_DARKNET_DIR to a folder of its data/"
        rm -rf "$tmp"
        exit 1
    fi
    deb=$(ls "$tmp"/darknet_*.deb | head -n 1)
    dpkg-deb -x "$deb" "$tmp/x"
    mkdir -p "$target/data"
    cp "$tmp"/x/usr/share/darknet/data/*.jpg "$target/data/"
    cp "$tmp"/x/usr/share/doc/darknet/copyright "$target/copyright"
    log "extracted the darknet package's photos into $target/data ($(basename "$deb"))"
    rm -rf "$tmp"
}

install_debian_packages
create_venv
install_project
install_pillow_simd
install_darknet_photos
log "ready: $("$VENV/bin/python" -c 'import PIL, torch, prefect; print(f"PIL {PIL.__version__}, torch {torch.__version__}, prefect {prefect.__version__}")')"
