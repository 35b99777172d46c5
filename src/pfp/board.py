"""A bundle on the board: predict with the torch-free runtime under the emulated Pi 4, time it over RPC.

:func:`run_bundle_on_board` deploys a bundle the way a board gets it: a fresh folder holding a copy
of the ``pfp_runtime`` package (nothing else of this repo), the bundle and the images (``.npy``),
run by the emulated Raspberry Pi 4's Python (``infra/rpc/emulated-pi.sh``: Debian's arm64
python3.11, numpy and the aarch64 TVM wheel under ``qemu-aarch64-static``; no torch) with
``PYTHONPATH`` set to that copy alone; the outputs come back as ``.npz``. The board-side script
also reports which modules it imported (no torch, no ``tvm`` package, nothing from outside the
copy, the board's standard library and its site-packages).

:func:`pfp.backends.tvm.remote.bundle_latency_over_rpc` times a deployed bundle on a board (real
or emulated) found through an RPC tracker.

Command line::

    python -m pfp.board predict BUNDLE IMAGES.npy [--out OUT.npz]            # on the emulated Pi 4
    python -m pfp.board latency BUNDLE --tracker HOST:PORT --key KEY [--emulated | --no-emulated]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pfp_runtime import DEFAULT_THREADS  # importing pfp_runtime loads no TVM (tvm_ffi only when a bundle loads)

__all__ = ["BOARD_OUTPUTS", "BoardError", "BoardRun", "EMULATED_PI_SCRIPT", "emulated_pi_python", "main",
           "run_bundle_on_board", "runtime_package"]

EMULATED_PI_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "rpc" / "emulated-pi.sh"
#: what :func:`run_bundle_on_board` returns per image (``pfp_runtime.Prediction``'s fields)
BOARD_OUTPUTS = ("probs", "predicted", "logit_mean", "logit_var", "mi", "sme", "ood")
BUILD_TIMEOUT = 1200.0  # a cold build of the emulated Pi downloads ~130 MB

# The board side: imports numpy and the copied pfp_runtime only. (Under qemu-user /proc/cpuinfo is the
# host's; pfp_runtime reads AArch64 CPU features from AT_HWCAP, which qemu sets from the emulated CPU.)
_DRIVER = r'''
import json, os, sys, time
start = time.perf_counter()
import numpy as np
import pfp_runtime
imported = {"torch": "torch" in sys.modules, "tvm": "tvm" in sys.modules, "tvm_ffi": "tvm_ffi" in sys.modules}
import_seconds = time.perf_counter() - start
from pfp_runtime import bundle as bundle_module, load_bundle

from pfp_runtime._cpu import _aarch64_hwcap_features as hwcap_features

bundle_dir, images_path, out_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
try:  # the runtime's own check (on aarch64 the CPU features come from AT_HWCAP, also under qemu-user)
    bundle_module.read_bundle(bundle_dir)
    cpuinfo_check = "accepted"
except bundle_module.BundleError as error:
    cpuinfo_check = str(error)
start = time.perf_counter()
predictor = load_bundle(bundle_dir, threads=threads)
load_seconds = time.perf_counter() - start
images = np.load(images_path)
start = time.perf_counter()
prediction = predictor.predict(images)
predict_seconds = time.perf_counter() - start

runtime_root = os.path.dirname(os.path.abspath(pfp_runtime.__file__))
stdlib = os.path.dirname(os.__file__)
sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
allowed = [runtime_root + os.sep, stdlib + os.sep] + [p + os.sep for p in sites]
outside = sorted(name for name, module in list(sys.modules.items())
                 if name != "__main__" and getattr(module, "__file__", None)
                 and not any(os.path.abspath(module.__file__).startswith(root) for root in allowed))
import platform
info = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
        "executable": sys.executable, "sys_path": sys.path, "runtime_package": runtime_root,
        "after_import": imported,
        "after_predict": {"torch": "torch" in sys.modules, "tvm": "tvm" in sys.modules},
        "tvm_modules": sorted(name for name in sys.modules if name == "tvm" or name.startswith("tvm.")),
        "project_modules": sorted(name for name in sys.modules if name.split(".")[0] in ("pfp", "tasks", "flows", "tests")),
        "modules_outside": outside,
        "cpuinfo_check": cpuinfo_check, "hwcap_features": sorted(hwcap_features()),
        "describe": predictor.describe(), "import_seconds": import_seconds, "load_seconds": load_seconds,
        "predict_seconds": predict_seconds, "images": list(images.shape)}
np.savez(out_path, info=json.dumps(info), **prediction.to_dict())
'''

# `import torch` anywhere on the board runs this package instead (first on PYTHONPATH): it notes who
# imported it and fails as on a board without torch; the run reports it.
_TORCH_TRIPWIRE = r'''
import os, traceback
with open(os.environ["PFP_BOARD_TORCH_TRIPWIRE"], "a") as log:
    log.write("".join(traceback.format_stack()[:-1]) + "\n")
raise ImportError("torch is not installed on the board (tripwire of pfp.board)")
'''


class BoardError(RuntimeError):
    """The board could not run the bundle: missing emulator, the board's Python failed, no outputs."""


@dataclass
class BoardRun:
    """What the board computed (``outputs``: :data:`BOARD_OUTPUTS`) and how (``info``: modules, versions, seconds)."""

    outputs: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
    torch_imports: list[str] = field(default_factory=list)  # stacks of every `import torch` attempted on the board


def runtime_package() -> Path:
    """The folder of the ``pfp_runtime`` package (found without importing it)."""
    spec = importlib.util.find_spec("pfp_runtime")
    if spec is None or not spec.submodule_search_locations:
        raise BoardError("the pfp_runtime package is not importable here (src/ on PYTHONPATH?)")
    return Path(list(spec.submodule_search_locations)[0])


def _require_qemu() -> None:
    if shutil.which("qemu-aarch64-static") is None:
        raise BoardError("qemu-aarch64-static not found: the emulated Raspberry Pi needs the Debian package "
                         "qemu-user-static (make system-deps, or apt-get install qemu-user-static)")


@functools.cache
def emulated_pi_python(timeout: float = BUILD_TIMEOUT) -> Path:
    """The emulated Pi 4's Python (``emulated-pi.sh path``: built on first use, then cached)."""
    _require_qemu()
    if not EMULATED_PI_SCRIPT.is_file():
        raise BoardError(f"{EMULATED_PI_SCRIPT} not found (run from a checkout of the repo)")
    env = dict(os.environ)
    env.setdefault("HOST_PYTHON", sys.executable)
    try:
        result = subprocess.run(["bash", str(EMULATED_PI_SCRIPT), "path"], env=env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BoardError(f"emulated-pi.sh path did not finish in {timeout:.0f} s (building the emulated Pi)") from None
    if result.returncode != 0:
        raise BoardError(f"emulated-pi.sh path failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    python = Path(result.stdout.strip().splitlines()[-1]) / "bin" / "python3"
    if not python.is_file():
        raise BoardError(f"emulated-pi.sh path printed {python.parent.parent}, which has no bin/python3")
    return python


def _board_env(site: Path, tripwire: Path, threads: int) -> dict[str, str]:
    """A clean environment: PYTHONPATH is the deployed folder alone (nothing of the host's Python leaks in)."""
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR", "EMULATED_PI_CPU") if name in os.environ}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", TVM_NUM_THREADS=str(threads),
               PFP_BOARD_TORCH_TRIPWIRE=str(tripwire))
    return env


def run_bundle_on_board(bundle_dir: str | Path, images: np.ndarray, *, python: str | Path | None = None, threads: int = 1,
                        timeout: float = 1800.0, torch_tripwire: bool = True) -> BoardRun:
    """Predict ``images`` with ``bundle_dir`` on the board's Python (default: the emulated Pi 4).

    The board gets a fresh folder: ``site/pfp_runtime`` (a copy of the package; ``site`` is the only
    entry of ``PYTHONPATH``), ``bundle/`` (a copy of the bundle) and ``images.npy``; it runs
    ``load_bundle(bundle).predict(images)`` (:mod:`pfp_runtime`) and writes the outputs to ``.npz``.
    With ``torch_tripwire`` a ``torch`` package that records its importers comes first on the
    path, so an import of torch (which the board does not have) is reported, not just failed.
    """
    images = np.asarray(images)
    emulated = python is None
    if emulated:
        _require_qemu()  # checked on every run: emulated_pi_python() is cached
    python = Path(python) if python is not None else emulated_pi_python()
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "bundle.json").is_file():
        raise BoardError(f"{bundle_dir}: not a bundle folder (no bundle.json)")
    with tempfile.TemporaryDirectory(prefix="pfp-board-") as tmp:
        root = Path(tmp)
        site = root / "site"
        shutil.copytree(runtime_package(), site / "pfp_runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if torch_tripwire:
            (site / "torch").mkdir()
            (site / "torch" / "__init__.py").write_text(_TORCH_TRIPWIRE)
        shutil.copytree(bundle_dir, root / "bundle")
        np.save(root / "images.npy", images)
        (root / "driver").mkdir()  # the script's folder is sys.path[0]: it holds the script alone
        (root / "driver" / "run_bundle.py").write_text(_DRIVER)
        tripwire = root / "torch-imports.log"
        command = [str(python), str(root / "driver" / "run_bundle.py"), str(root / "bundle"), str(root / "images.npy"),
                   str(root / "out.npz"), str(threads)]
        start = time.monotonic()
        try:
            result = subprocess.run(command, cwd=root, env=_board_env(site, tripwire, threads), capture_output=True,
                                    text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BoardError(f"the board's Python ({python}) did not finish in {timeout:.0f} s") from None
        seconds = time.monotonic() - start
        if result.returncode != 0:
            raise BoardError(f"the board's Python ({python}) failed with exit code {result.returncode}:\n"
                             f"{result.stderr.strip()[-3000:]}")
        if not (root / "out.npz").is_file():
            raise BoardError(f"the board's Python ({python}) wrote no outputs:\n{result.stderr.strip()[-3000:]}")
        with np.load(root / "out.npz") as archive:
            outputs = {name: archive[name] for name in BOARD_OUTPUTS}
            info = json.loads(str(archive["info"]))
        torch_imports = [stack for stack in tripwire.read_text().split("\n\n") if stack.strip()] if tripwire.exists() else []
        return BoardRun(outputs=outputs, info=info, seconds=seconds, torch_imports=torch_imports)


# --------------------------------------------------------------------------- command line

def _emulated_from_params(path: str | None, key: str | None) -> tuple[bool | None, str | None, str | None]:
    """``tune.rpc`` of a params file: (emulated, tracker, key); Nones when there is no such file or section."""
    if path is None:
        path = "params.yaml" if Path("params.yaml").is_file() else None
        if path is None:
            return None, None, None
    from pfp.config import ConfigError, load_params

    try:
        rpc = load_params(path).tune.rpc
    except ConfigError as error:
        raise BoardError(f"{path}: cannot take the tracker, key and emulated flag from it ({error}); "
                         "give --tracker, --key and --emulated/--no-emulated, or --params FILE") from None
    if rpc.key is None or (key is not None and key != rpc.key):
        return None, rpc.tracker, rpc.key
    return rpc.emulated, rpc.tracker, rpc.key


def _predict(args: argparse.Namespace) -> int:
    images = np.load(args.images)
    run = run_bundle_on_board(args.bundle, images, threads=args.threads)
    out = Path(args.out or Path(args.images).with_suffix(".board.npz"))
    np.savez(out, **run.outputs)
    info = run.info
    print(f"{info['machine']} python {info['python']} (torch imported: {info['after_predict']['torch']}, "
          f"tvm package imported: {info['after_predict']['tvm']}): {len(images)} image(s) in {info['predict_seconds']:.2f} s "
          f"(load {info['load_seconds']:.2f} s, whole run {run.seconds:.1f} s) -> {out}")
    for i, (label, ood) in enumerate(zip(run.outputs["predicted"], run.outputs["ood"])):
        print(f"  image {i}: class {int(label)} p={float(run.outputs['probs'][i, label]):.3f} "
              f"mi={float(run.outputs['mi'][i]):.4f}{' OOD' if ood else ''}")
    return 0


def _latency(args: argparse.Namespace) -> int:
    emulated = tracker = key = None
    if args.params or None in (args.tracker, args.key, args.emulated):  # only what the command line leaves open
        emulated, tracker, key = _emulated_from_params(args.params, args.key)
    tracker, key = args.tracker or tracker, args.key or key
    if tracker is None or key is None:
        raise SystemExit("error: give --tracker HOST:PORT and --key KEY (or a params file with tune.rpc.tracker and key)")
    if args.emulated is not None:
        emulated = args.emulated
    if emulated is None:
        raise SystemExit(f"error: is the board under key {key!r} emulated? say --emulated or --no-emulated "
                         "(or use a params file whose tune.rpc names this key)")
    from pfp.backends.tvm.remote import RemoteError, bundle_latency_over_rpc
    from pfp.backends.tvm.tuning.measure import TrackerError
    from pfp_runtime.bundle import BundleError

    try:
        rows = bundle_latency_over_rpc(args.bundle, tracker, key, emulated=emulated, number=args.number, repeat=args.repeat,
                                       threads=args.threads or None, batch_sizes=args.batch_size or None)
    except (RemoteError, TrackerError, BundleError) as error:
        raise BoardError(str(error)) from None
    for row in rows:
        print(f"{row['model']} {row['target']} batch {row['batch_size']:>4}: median {row['median_ms']:.3f} ms, "
              f"mean {row['mean_ms']:.3f} ms ({row['per_image_ms']:.3f} ms/image) on {row['key']}, "
              f"{row['threads'] or 'server default'} thread(s)"
              f"{' (EMULATED: not a board timing)' if row['emulated'] else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfp.board", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="predict on the emulated Raspberry Pi 4 (torch-free runtime)")
    predict.add_argument("bundle", help="bundle folder (target rasp4b)")
    predict.add_argument("images", help=".npy of images: uint8 0-255 or float 0-1, (N, 28, 28) or (N, 1, 28, 28)")
    predict.add_argument("--out", help="outputs .npz (default: IMAGES.board.npz)")
    predict.add_argument("--threads", type=int, default=1)
    predict.set_defaults(handler=_predict)
    latency = commands.add_parser("latency", help="whole-model latency of a bundle on a board over RPC")
    latency.add_argument("bundle", help="bundle folder of the board's target")
    latency.add_argument("--tracker", help="RPC tracker HOST:PORT (default: the params file's tune.rpc.tracker)")
    latency.add_argument("--key", help="the board's key at the tracker (default: tune.rpc.key)")
    latency.add_argument("--emulated", action=argparse.BooleanOptionalAction, default=None,
                         help="the board is an emulator (default: tune.rpc.emulated of the params file when its key matches)")
    latency.add_argument("--params", help="params file for the defaults (default: ./params.yaml when present)")
    latency.add_argument("--number", type=int, default=10, help="calls per measurement")
    latency.add_argument("--repeat", type=int, default=5, help="measurements")
    latency.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                         help=f"the board's TVM threads (default {DEFAULT_THREADS}, the runtime's; 0: the RPC server's own pool)")
    latency.add_argument("--batch-size", type=int, action="append", help="only this compiled batch size (repeatable)")
    latency.add_argument("--json", help="write the rows to this file")
    latency.set_defaults(handler=_latency)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BoardError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
