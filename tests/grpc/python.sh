#!/usr/bin/env bash
# Print the path of a python3 interpreter that can import what a test needs.
#
# Usage: python.sh [MODULE=PACKAGE]...   (default: grpc=grpcio)
# e.g.   python.sh opentelemetry.proto.collector.trace.v1.trace_service_pb2=opentelemetry-proto
#
# Order:
#   1. the python3 on PATH, when it already has the modules;
#   2. else a virtualenv at "${GOSSAMER_PYENV:-<repo>/target/pyenv}", made with
#      `python3 -m venv` (installing Debian's python3-venv when running as root
#      and the venv module is missing) and given the packages with pip.
#
# stdout gets exactly one line, the interpreter's path, and the exit code is 0.
# When a package cannot be had, a message naming it (or python3-venv) goes to
# stderr and the exit code is 1. Installer noise goes to stderr. Safe to run
# from several processes at once: the venv is made under `flock` on
# "<venv>.lock". Quick once installed: one import.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/../.." && pwd)
venv=${GOSSAMER_PYENV:-$repo/target/pyenv}
vpy=$venv/bin/python

die() {
    echo "python.sh: $*" >&2
    exit 1
}

pairs=("$@")
[ ${#pairs[@]} -gt 0 ] || pairs=(grpc=grpcio)
modules=() packages=()
for pair in "${pairs[@]}"; do
    modules+=("${pair%%=*}")
    packages+=("${pair#*=}")
done

# has_modules PYTHON: PYTHON runs and can import every module.
has_modules() {
    local m
    for m in "${modules[@]}"; do
        "$1" -c "import $m" >/dev/null 2>&1 || return 1
    done
}

# real_path PYTHON: the interpreter's own path (resolves pyenv-style shims).
real_path() {
    "$1" -c 'import sys; print(sys.executable)'
}

# can_venv PYTHON: PYTHON can make a venv with pip in it (Debian strips
# ensurepip out of python3 into python3-venv).
can_venv() {
    "$1" -c 'import venv, ensurepip' >/dev/null 2>&1
}

# install_venv_module: apt-get install python3-venv, quietly, as root only.
install_venv_module() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -qq -y)
    "${apt[@]}" install python3-venv >&2 2>/dev/null && return 0
    "${apt[@]}" update >&2 2>/dev/null || true
    "${apt[@]}" install python3-venv >&2 2>/dev/null
}

# pick_base: print an interpreter able to make a venv, installing
# python3-venv if that is what is missing.
pick_base() {
    local candidates=() py
    py=$(command -v python3 || true)
    [ -n "$py" ] && candidates+=("$py")
    [ -x /usr/bin/python3 ] && [ "$py" != /usr/bin/python3 ] && candidates+=(/usr/bin/python3)
    [ ${#candidates[@]} -gt 0 ] || die "no python3 found; install the Debian package python3-venv (it brings python3)"
    for py in "${candidates[@]}"; do
        if can_venv "$py"; then echo "$py"; return 0; fi
    done
    install_venv_module || die "python3 cannot make a virtualenv: missing package python3-venv"
    # Debian's package serves Debian's python3.
    for py in /usr/bin/python3 "${candidates[@]}"; do
        if [ -x "$py" ] && can_venv "$py"; then echo "$py"; return 0; fi
    done
    die "python3 cannot make a virtualenv even after installing: missing package python3-venv"
}

# make_venv: create or repair the venv and install the packages into it.
make_venv() {
    if [ -d "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
        die "$venv is not a venv; remove it or set GOSSAMER_PYENV elsewhere"
    fi
    if [ -f "$venv/pyvenv.cfg" ] && ! "$vpy" -m pip --version >/dev/null 2>&1; then
        # A venv left half-made (interrupted, or its python gone): start over.
        rm -rf "$venv"
    fi
    if [ ! -x "$vpy" ]; then
        local base
        base=$(pick_base)
        "$base" -m venv "$venv" >&2 || die "'$base -m venv $venv' failed: missing package python3-venv?"
    fi
    pip_install "${packages[@]}" || die "pip could not install the missing package(s) ${packages[*]}"
    # pip skips a package it thinks is there, even when its files are broken.
    has_modules "$vpy" || pip_install --force-reinstall "${packages[@]}" ||
        die "pip could not reinstall the missing package(s) ${packages[*]}"
    has_modules "$vpy" || die "${packages[*]} installed but importing ${modules[*]} still fails: missing package(s) ${packages[*]}"
}

# pip_install ARGS...: pip install quietly into the venv, noise to stderr.
pip_install() {
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "$vpy" -m pip install -q "$@" >&2
}

main() {
    local py
    py=$(command -v python3 || true)
    if [ -n "$py" ] && has_modules "$py"; then
        real_path "$py"
        return 0
    fi
    if ! has_modules "$vpy"; then
        mkdir -p "$(dirname "$venv")"
        exec 9>"$venv.lock"
        flock 9
        # Another process may have finished the job while we waited.
        has_modules "$vpy" || make_venv
        exec 9>&-
    fi
    echo "$vpy"
}

main
