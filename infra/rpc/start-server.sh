#!/usr/bin/env bash
# Start a TVM RPC server registered at a tracker under a key (foreground). Env overrides:
#   PYTHON (default: python3, or $VIRTUAL_ENV/bin/python), TRACKER (127.0.0.1:9190), RPC_KEY (local-cpu),
#   SERVER_HOST (0.0.0.0), SERVER_PORT (9090), SERVER_PORT_END (9199), CUSTOM_ADDR (address the tracker
#   hands to clients; set it on a board behind NAT), LOAD_LIBRARY (default: libtvm_runtime_extra.so
#   of the installed tvm package, needed by the Meta Scheduler's random fill on runtime-only builds;
#   set LOAD_LIBRARY=none to skip).
set -euo pipefail
PYTHON="${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
PYTHON="${PYTHON:-python3}"
TRACKER="${TRACKER:-127.0.0.1:9190}"
RPC_KEY="${RPC_KEY:-local-cpu}"
SERVER_HOST="${SERVER_HOST:-0.0.0.0}"
SERVER_PORT="${SERVER_PORT:-9090}"
SERVER_PORT_END="${SERVER_PORT_END:-9199}"

args=(--tracker "$TRACKER" --key "$RPC_KEY" --host "$SERVER_HOST" --port "$SERVER_PORT" --port-end "$SERVER_PORT_END")
if [[ -n "${CUSTOM_ADDR:-}" ]]; then
    args+=(--custom-addr "$CUSTOM_ADDR")
fi
if [[ -z "${LOAD_LIBRARY:-}" ]]; then
    # Find the library without importing tvm (import tvm is slow on a board).
    tvm_dir="$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("tvm"); print(s.submodule_search_locations[0] if s else "")')"
    if [[ -n "$tvm_dir" && -f "$tvm_dir/lib/libtvm_runtime_extra.so" ]]; then
        LOAD_LIBRARY="$tvm_dir/lib/libtvm_runtime_extra.so"
    fi
fi
if [[ -n "${LOAD_LIBRARY:-}" && "${LOAD_LIBRARY}" != "none" ]]; then
    args+=(--load-library "$LOAD_LIBRARY")
fi
echo "RPC server key ${RPC_KEY} -> tracker ${TRACKER} (python: ${PYTHON}; load-library: ${LOAD_LIBRARY:-none})" >&2
exec "$PYTHON" -m tvm.exec.rpc_server "${args[@]}" "$@"
