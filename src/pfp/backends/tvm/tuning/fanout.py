"""Trials per second with one board and with every board under a tracker key, measured in one run.

``python -m pfp.backends.tvm.tuning.fanout --tracker HOST:PORT --key KEY`` tunes the same module
twice, in fresh work dirs: first measuring on one board at a time (``rpc_workers=1``), then on all
the servers the tracker reports under the key at once, and prints both rates:

* ``trials/s``: search trials per wall-clock second of the Meta Scheduler's search (candidate
  generation, building and measuring; what a user waits for);
* ``measured/s``: search trials per second during which at least one board was measuring (the
  union of the boards' sessions; what fan-out can speed up).

``--cooldown-ms`` makes each board rest between repeats (``time_evaluator``'s cooldown, see
:func:`~.boards.run_evaluator_cooled`), i.e. a measurement that is mostly waiting on the board, as
on boards that must not overheat, or any board that is slower than the host building for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

from pfp.backends.tvm.tuning.boards import busy_seconds, concurrency
from pfp.backends.tvm.tuning.config import TuneConfig, TuneReport

__all__ = ["compare_fanout", "fanout_module", "main", "run_summary"]


def fanout_module(model: str = "mlp", batch_size: int = 1, seed: int = 0):
    """The PFP Relax module of ``model``'s architecture with seeded random weights (timing does not depend on them)."""
    import torch

    from pfp.backends.torch_ref import GaussianLayerParams
    from pfp.backends.tvm.graph import build_pfp_module
    from pfp.spec import build_spec

    spec = build_spec(model)
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for layer in spec.parametric_layers():
        fan_in = int(torch.tensor(layer.weight_shape[1:]).prod())
        params[layer.name] = GaussianLayerParams.from_mean_var(
            torch.randn(layer.weight_shape, generator=generator) / fan_in**0.5,
            torch.full(layer.weight_shape, 1e-3), torch.zeros(layer.bias_shape), torch.full(layer.bias_shape, 1e-3))
    return build_pfp_module(spec, params, batch_size=batch_size)


def run_summary(report: TuneReport) -> dict:
    """The figures of one tuning run's search: boards, trials, seconds, rates, sessions open at once."""
    search = [item for item in report.measurements if item["phase"] == "search"]
    busy = busy_seconds(search)
    return {"rpc_workers": report.rpc_workers, "boards": report.boards("search"), "trials": report.search_trials,
            "failed": sum(item["ms"] is None for item in search), "search_seconds": report.search_seconds,
            "measuring_seconds": busy, "trials_per_second": report.trials_per_second or 0.0,
            "measured_per_second": len(search) / busy if busy else 0.0, "most_at_once": concurrency(search)}


def compare_fanout(mod, config: TuneConfig, work_dir: str | Path | None = None,
                   reports: dict[str, TuneReport] | None = None) -> dict:
    """Tune ``mod`` with ``config`` twice in fresh work dirs under ``work_dir``: one board at a time, then all at once.

    Returns ``{"one": run_summary, "all": run_summary, "speedup": {...}}``; the speed-ups are
    all-boards rate / one-board rate. The module's hand schedules are measured too (not counted).
    ``reports`` (if given) receives the two runs' :class:`TuneReport` under ``"one"`` and ``"all"``.
    """
    from pfp.backends.tvm.tuning.search import tune_module

    if not config.uses_rpc:
        raise ValueError("compare_fanout measures on RPC boards: set rpc_tracker and rpc_key in the config")
    parent = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pfp_fanout_"))
    runs = {}
    for name, workers in (("one", 1), ("all", None)):
        run_dir = parent / name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"{run_dir}: the comparison needs a fresh work dir (it must not resume)")
        report = TuneReport()
        if reports is not None:
            reports[name] = report
        tune_module(mod, config=dataclasses.replace(config, work_dir=str(run_dir), rpc_workers=workers),
                    report=report)
        runs[name] = run_summary(report)
    one, every = runs["one"], runs["all"]
    speedup = {rate: every[rate] / one[rate] if one[rate] else 0.0
               for rate in ("trials_per_second", "measured_per_second")}
    return {"tracker": config.rpc_tracker, "key": config.rpc_key, "cooldown_ms": config.cooldown_ms,
            "number": config.number, "repeat": config.repeat, "min_repeat_ms": config.min_repeat_ms,
            "one": one, "all": every, "speedup": speedup}


def _table(result: dict) -> str:
    rows = [f"key {result['key']} at {result['tracker']}; per candidate {result['number']} x {result['repeat']} runs "
            f"(min {result['min_repeat_ms']} ms each), cooldown {result['cooldown_ms']} ms between repeats",
            f"{'':14s}{'at once':>8s}{'trials':>8s}{'search s':>10s}{'trials/s':>10s}{'measuring s':>13s}"
            f"{'measured/s':>12s}  boards (trials)"]
    for name, label in (("one", "one board"), ("all", "all boards")):
        run = result[name]
        boards = ", ".join(f"{board} ({count})" for board, count in run["boards"].items())
        rows.append(f"{label:14s}{run['most_at_once']:>8d}{run['trials']:>8d}{run['search_seconds']:>10.1f}"
                    f"{run['trials_per_second']:>10.3f}{run['measuring_seconds']:>13.1f}"
                    f"{run['measured_per_second']:>12.3f}  {boards}")
    speedup = result["speedup"]
    rows.append(f"all / one: trials/s x{speedup['trials_per_second']:.2f}, "
                f"measured/s x{speedup['measured_per_second']:.2f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfp.backends.tvm.tuning.fanout", description=__doc__.split("\n")[0])
    parser.add_argument("--tracker", required=True, help="the RPC tracker, host:port")
    parser.add_argument("--key", required=True, help="the key the boards registered under")
    parser.add_argument("--model", default="mlp", help="architecture whose PFP module is tuned (default: mlp)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the module (default: 1)")
    parser.add_argument("--target", default="host", help="compile target name (default: host)")
    parser.add_argument("--trials", type=int, default=16, help="search trials per task (default: 16)")
    parser.add_argument("--number", type=int, default=3, help="runs per repeat of a candidate (default: 3)")
    parser.add_argument("--repeat", type=int, default=1, help="repeats per candidate (default: 1)")
    parser.add_argument("--min-repeat-ms", type=int, default=100, help="least ms per repeat (default: 100)")
    parser.add_argument("--cooldown-ms", type=int, default=0, help="board rest between repeats (default: 0)")
    parser.add_argument("--work-dir", help="parent of the two fresh work dirs (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="show the Meta Scheduler's progress tables")
    args = parser.parse_args(argv)
    if not args.verbose:  # its console handler takes this level when tuning starts
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    from pfp.backends.tvm.tuning.measure import TrackerError, check_tracker
    from pfp.io import atomic_write_json

    try:
        check_tracker(args.tracker, args.key)  # before the module is built: a wrong address fails in a second
        config = TuneConfig(trials_per_task=args.trials, max_trials_global=10_000, num_trials_per_iter=args.trials,
                            target=args.target, rpc_tracker=args.tracker, rpc_key=args.key, number=args.number,
                            repeat=args.repeat, min_repeat_ms=args.min_repeat_ms, cooldown_ms=args.cooldown_ms,
                            finalists=0)
        result = compare_fanout(fanout_module(args.model, args.batch), config, args.work_dir)
    except (ValueError, TrackerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_table(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
