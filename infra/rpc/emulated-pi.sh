#!/usr/bin/env bash
# An emulated Raspberry Pi 4 (aarch64) for TVM RPC, built from registry packages only: Debian's arm64
# python3.11 and its libraries unpacked into a sysroot, the aarch64 apache-tvm / apache-tvm-ffi / numpy
# wheels from PyPI, run by qemu-aarch64-static. `start` registers tvm.exec.rpc_server at a tracker
# under a key (default rasp4b-emulated) through start-server.sh, exactly as on a real board.
#
# Usage: infra/rpc/emulated-pi.sh [build|start|check|path|run|stop|help] [-- extra rpc_server arguments]
#   build   build the runtime folder (cached; a no-op when it exists)
#   start   build if needed, then start the RPC server (foreground; `start --detach`: background,
#           log and pid file in the cache folder, stopped with `stop`)
#   check   build if needed, then import tvm under the emulator and start a child interpreter
#   path    build if needed, then print the runtime folder (its bin/python3 is the board's Python)
#   run     build if needed, then run the board's Python with the remaining arguments (a script and
#           its arguments, -c CODE, -m MODULE; PYTHONPATH and the rest of the environment pass through),
#           e.g. PYTHONPATH=/tmp/deploy infra/rpc/emulated-pi.sh run -c 'import pfp_runtime'
#   stop    stop a server started with `start --detach`
#
# Env overrides: PFP_EMULATED_PI_CACHE (cache root, default ~/.cache/pfp/emulated-pi), HOST_PYTHON
# (runs pip on the host and gives the versions; default: the repo's .venv, else python3),
# TVM_VERSION / TVM_FFI_VERSION / NUMPY_VERSION (default: the versions installed in HOST_PYTHON),
# EMULATED_PI_CPU (qemu -cpu, default cortex-a72 as on a Pi 4), TVM_USE_RUNTIME_LIB (default 1: the
# server loads libtvm_runtime only, not the 240 MB compiler library; set 0 to load both), and those of
# start-server.sh: TRACKER (127.0.0.1:9190), RPC_KEY (rasp4b-emulated), SERVER_HOST (127.0.0.1),
# SERVER_PORT (9090), SERVER_PORT_END (9199, or SERVER_PORT+100 when SERVER_PORT is set), CUSTOM_ADDR,
# LOAD_LIBRARY.
#
# There is no binfmt_misc in these containers: bin/python3 is a shell wrapper that runs the aarch64
# interpreter under qemu with argv[0] set to the wrapper (qemu -0), so sys.executable is the wrapper
# and every child interpreter (the server's popen worker, multiprocessing) re-enters the emulator.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
LAYOUT=1  # bump when the folder's layout or content changes: it is part of the cache key

if [[ -z "${HOST_PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then HOST_PYTHON="$REPO/.venv/bin/python"
    elif [[ -n "${VIRTUAL_ENV:-}" ]]; then HOST_PYTHON="$VIRTUAL_ENV/bin/python"
    else HOST_PYTHON=python3
    fi
fi
CACHE_ROOT="${PFP_EMULATED_PI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pfp/emulated-pi}"
SUDO=""
[[ "$(id -u)" == 0 ]] || SUDO=sudo

log() { echo "emulated-pi: $*" >&2; }
die() { log "error: $*"; exit 1; }

host_version() {  # the version of a distribution installed in HOST_PYTHON, else $2
    "$HOST_PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || echo "$2"
}
TVM_VERSION="${TVM_VERSION:-$(host_version apache-tvm 0.27.0.post1)}"
TVM_FFI_VERSION="${TVM_FFI_VERSION:-$(host_version apache-tvm-ffi 0.1.14.post1)}"
NUMPY_VERSION="${NUMPY_VERSION:-$(host_version numpy 2.4.6)}"
KEY="cp311-tvm${TVM_VERSION}-ffi${TVM_FFI_VERSION}-numpy${NUMPY_VERSION}-layout${LAYOUT}"
RUNTIME="$CACHE_ROOT/$KEY"

# Debian arm64 packages: the interpreter and the libraries the wheels link (libstdc++, libgcc_s);
# their dependencies are resolved by apt. Skipped: what only a package manager needs.
DEB_ROOTS=(python3.11:arm64 libstdc++6:arm64 libgcc-s1:arm64)
DEB_SKIP='^(dpkg|install-info|tar|debconf|perl-base|coreutils):'
# PyPI: the aarch64 wheels (apache-tvm[rpc]: tornado, psutil, cloudpickle for the RPC server).
# Wheels carry manylinux_2_17 .. manylinux_2_28 tags; Debian 12's glibc is 2.36.
PIP_PLATFORMS=()
for glibc in $(seq 36 -1 17); do PIP_PLATFORMS+=(--platform "manylinux_2_${glibc}_aarch64"); done
PIP_PLATFORMS+=(--platform manylinux2014_aarch64)
PIP_TAGS=(--only-binary=:all: "${PIP_PLATFORMS[@]}" --python-version 3.11 --implementation cp
          --abi cp311 --abi abi3 --abi none)
PIP_REQUIREMENTS=("apache-tvm[rpc]==$TVM_VERSION" "apache-tvm-ffi==$TVM_FFI_VERSION" "numpy==$NUMPY_VERSION")

ensure_system_packages() {
    local install=() update=0
    command -v qemu-aarch64-static >/dev/null || install+=(qemu-user-static)
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        log "adding the dpkg architecture arm64 (for apt-get download of arm64 packages)"
        $SUDO dpkg --add-architecture arm64
        update=1
    fi
    apt-cache show python3.11:arm64 >/dev/null 2>&1 || update=1
    if ((update)) || ((${#install[@]})); then
        $SUDO apt-get update -qq
    fi
    if ((${#install[@]})); then
        log "installing ${install[*]}"
        $SUDO apt-get install -y -qq "${install[@]}" >/dev/null
    fi
    command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static not found (apt-get install qemu-user-static)"
    apt-cache show python3.11:arm64 >/dev/null 2>&1 || die "apt has no python3.11:arm64 (dpkg --add-architecture arm64 && apt-get update)"
}

write_wrapper() {  # $1: runtime folder
    mkdir -p "$1/bin"
    cat >"$1/bin/python3" <<'EOF'
#!/bin/sh
# aarch64 Python of the emulated Raspberry Pi (generated by infra/rpc/emulated-pi.sh). argv[0] is this
# script (qemu -0), so sys.executable is too and child interpreters re-enter the emulator.
here="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONHOME="$here/sysroot/usr"
export TVM_USE_RUNTIME_LIB="${TVM_USE_RUNTIME_LIB:-1}"
exec qemu-aarch64-static -L "$here/sysroot" -cpu "${EMULATED_PI_CPU:-cortex-a72}" -0 "$here/bin/python3" \
    "$here/sysroot/usr/bin/python3.11" "$@"
EOF
    chmod 755 "$1/bin/python3"
    ln -sf python3 "$1/bin/python"
}

build() {
    [[ -x "$RUNTIME/bin/python3" ]] && return 0
    ensure_system_packages
    mkdir -p "$CACHE_ROOT"
    exec 9>"$CACHE_ROOT/.lock"
    flock 9  # one build at a time; a concurrent one may have finished meanwhile
    if [[ -x "$RUNTIME/bin/python3" ]]; then exec 9>&-; return 0; fi
    local start=$SECONDS tmp
    tmp="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
    chmod 755 "$tmp"
    BUILD_TMP="$tmp"
    trap 'rm -rf "$BUILD_TMP"' EXIT  # an interrupted build leaves nothing behind
    log "building $RUNTIME (cold build: about a minute, ~130 MB of downloads)"

    local debs="$CACHE_ROOT/debs" packages
    mkdir -p "$debs" "$tmp/sysroot"
    packages="$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "${DEB_ROOTS[@]}" | grep -E '^[a-z0-9][^ <>]*:arm64$' | grep -Ev "$DEB_SKIP" | sort -u)"
    # apt-get download keeps the .deb files of the current candidates in the shared debs/ folder
    # shellcheck disable=SC2086  # one package name a word
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" $packages)
    local package version file
    for package in $packages; do
        version="$(apt-cache policy "$package" | sed -n 's/^ *Candidate: //p')"
        file="$debs/${package%%:*}_${version//:/%3a}_arm64.deb"
        [[ -f "$file" ]] || file="${file%_arm64.deb}_all.deb"
        [[ -f "$file" ]] || die "no .deb downloaded for $package $version"
        dpkg-deb -x "$file" "$tmp/sysroot"
        echo "$package $version" >>"$tmp/debian-packages.txt"
    done

    local site="$tmp/sysroot/usr/lib/python3/dist-packages"  # on Debian's sys.path
    "$HOST_PYTHON" -m pip download -q -d "$CACHE_ROOT/wheels" "${PIP_TAGS[@]}" "${PIP_REQUIREMENTS[@]}"
    "$HOST_PYTHON" -m pip install -q --no-compile --no-index --find-links "$CACHE_ROOT/wheels" --target "$site" \
        "${PIP_TAGS[@]}" "${PIP_REQUIREMENTS[@]}"

    write_wrapper "$tmp"
    # Byte-compile once (the import of tvm under qemu takes ~2.5x longer without .pyc files); a
    # host CPython 3.11 writes the same .pyc format, else the emulated interpreter does it.
    local compiler=("$tmp/bin/python3")
    if "$HOST_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        compiler=("$HOST_PYTHON")
    fi
    "${compiler[@]}" -m compileall -q -j 0 -s "$tmp" -p "$RUNTIME" "$tmp/sysroot/usr/lib/python3.11" "$site" \
        >/dev/null 2>&1 || true  # a few stdlib test files do not compile on purpose

    "$tmp/bin/python3" -c 'import platform, numpy, tvm_ffi; assert platform.machine() == "aarch64"' \
        || die "the aarch64 interpreter in $tmp does not start"
    {
        echo "key: $KEY"
        echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s"
        echo "wheels: ${PIP_REQUIREMENTS[*]}"
        "$HOST_PYTHON" -m pip list --path "$site" --format freeze 2>/dev/null | sed 's/^/  /'
        echo "debian packages:"
        sed 's/^/  /' "$tmp/debian-packages.txt"
    } >"$tmp/MANIFEST"
    rm "$tmp/debian-packages.txt"
    mv -T "$tmp" "$RUNTIME"
    trap - EXIT
    exec 9>&-
    log "built $RUNTIME in $((SECONDS - start)) s ($(du -sh "$RUNTIME" | cut -f1))"
}

check() {
    build
    "$RUNTIME/bin/python3" - <<'EOF'
import platform, subprocess, sys, time
start = time.perf_counter()
import tvm, tvm.rpc, numpy
seconds = time.perf_counter() - start
child = subprocess.run([sys.executable, "-c", "import platform; print(platform.machine())"],
                       check=True, capture_output=True, text=True).stdout.strip()
assert platform.machine() == child == "aarch64", (platform.machine(), child)
print(f"emulated-pi: {platform.machine()} python {platform.python_version()}, tvm {tvm.__version__}, "
      f"numpy {numpy.__version__}; import tvm {seconds:.1f} s; runtime {tvm.runtime.__name__}; "
      f"child interpreter: {child} ({sys.executable})")
EOF
}

start() {
    local detach=0
    if [[ "${1:-}" == "--detach" || "${1:-}" == "-d" ]]; then detach=1; shift; fi
    [[ "${1:-}" == "--" ]] && shift
    build
    export PYTHON="$RUNTIME/bin/python3"
    export RPC_KEY="${RPC_KEY:-rasp4b-emulated}" TRACKER="${TRACKER:-127.0.0.1:9190}"
    export SERVER_HOST="${SERVER_HOST:-127.0.0.1}"
    if [[ -n "${SERVER_PORT:-}" && -z "${SERVER_PORT_END:-}" ]]; then
        export SERVER_PORT_END=$((SERVER_PORT + 100))  # start-server.sh's 9199 is below a port above it
    fi
    if ((detach)); then
        mkdir -p "$CACHE_ROOT/run"
        local pidfile="$CACHE_ROOT/run/$RPC_KEY.pid" logfile="$CACHE_ROOT/run/$RPC_KEY.log"
        setsid bash "$HERE/start-server.sh" "$@" >"$logfile" 2>&1 </dev/null &
        echo $! >"$pidfile"
        log "RPC server key $RPC_KEY -> tracker $TRACKER in the background (pid $!, log $logfile)"
        log "stop it with: $0 stop   (or: kill -- -$!)"
        return 0
    fi
    log "RPC server key $RPC_KEY -> tracker $TRACKER under qemu-aarch64-static ($RUNTIME)"
    log "stop it with Ctrl-C, or: kill -- -$(ps -o pgid= -p $$ | tr -d ' ')   (its process group: server and workers)"
    exec bash "$HERE/start-server.sh" "$@"
}

stop() {
    local key="${RPC_KEY:-rasp4b-emulated}" pidfile
    pidfile="$CACHE_ROOT/run/$key.pid"
    [[ -f "$pidfile" ]] || die "no $pidfile: no server started with 'start --detach' under key $key"
    local pid
    pid="$(cat "$pidfile")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
    log "stopped the server under key $key (process group $pid)"
}

command="${1:-start}"
[[ $# -gt 0 ]] && shift
case "$command" in
    build) build; echo "$RUNTIME" ;;
    path) build >&2; echo "$RUNTIME" ;;
    run) build >&2; [[ "${1:-}" == "--" ]] && shift; exec "$RUNTIME/bin/python3" "$@" ;;
    check) check ;;
    start) start "$@" ;;
    stop) stop ;;
    help|-h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) die "unknown command '$command' (build, start, check, path, run, stop, help)" ;;
esac
