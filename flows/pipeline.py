"""Prefect flow: run the pipeline by driving its DVC stages in order.

Each stage is one Prefect task that calls ``dvc repro --single-item STAGE``, so DVC decides
what changed and skips the rest. The flow opens a parent MLflow run; the stage processes
nest their runs under it. Without ``PREFECT_API_URL`` Prefect starts a temporary local
server by itself.

Output: each stage's (DVC, TVM, the Meta Scheduler, Pyro, MLflow, warnings) goes to
``WORKDIR/logs/STAGE.log`` and the flow's own (Prefect, MLflow) to ``WORKDIR/logs/flow.log``;
the terminal shows a progress bar over the stages and one summary table at the end, or the
end of the failing stage's log.

    python -m flows.pipeline                                  # params.yaml, in this repo
    python -m flows.pipeline --workdir runs/embedded --params configs/embedded.yaml
    python -m flows.pipeline --serve "0 3 * * 0"              # scheduled retraining
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The embedded server needs more than Prefect's default 20 s to start on a busy 2-core box;
# telemetry would only fail on these offline machines (DO_NOT_TRACK: the client's, whose first-run
# notice Prefect prints on a terminal when it is imported, before the output goes to the logs).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task  # noqa: E402

from flows import console  # noqa: E402
from flows.promotion import publish_and_promote  # noqa: E402
from flows.workspace import REPO_ROOT, prepare_workspace, stage_env  # noqa: E402
from pfp import tracking  # noqa: E402
from pfp.config import load_params  # noqa: E402
from pfp.io import atomic_write_json  # noqa: E402
from pfp.stage import PREPARED_DIR  # noqa: E402
from pfp.stages.report import headline_metrics  # noqa: E402

PER_MODEL_STAGES = ("train", "convert", "calibrate", "tune", "bundle", "evaluate")
# The flow's last step after the DVC stages (flows/promotion.py), as the progress and the summary name it.
PROMOTION_STEP = "publish+promote"


def stage_order(models: list[str]) -> list[str]:
    stages = ["prepare"]
    for stage in PER_MODEL_STAGES:
        stages += [f"{stage}@{model}" for model in models]
    return stages + ["report", "benchmark"]


@task(name="dvc-stage", task_run_name="{stage}")
def run_dvc_stage(stage: str, workdir: str, log_file: str | None = None) -> str:
    """Reproduce one stage; returns "ran" or "skipped" (DVC found nothing changed).

    With ``log_file`` the stage's whole output (DVC's, the stage process's and its libraries')
    goes there, not to the terminal. A failure raises :class:`flows.console.StageFailed` naming the log.
    """
    logger = get_run_logger()
    env = stage_env(stage)
    status = subprocess.run(["dvc", "status", "--json", stage], cwd=workdir, env=env, capture_output=True, text=True)
    changed = status.returncode != 0 or json.loads(status.stdout or "{}") != {}
    command = ["dvc", "repro", "--single-item", stage]
    if log_file is None:
        result = subprocess.run(command, cwd=workdir, env=env)
    else:
        with open(log_file, "w") as log:
            result = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise console.StageFailed(stage, result.returncode, log_file)
    outcome = "ran" if changed else "skipped"
    logger.info("stage %s: %s", stage, outcome)
    return outcome


# The terminal of the flow run (progress bar), when main() has sent the process's output to a log file.
_terminal: console.Console | None = None


@flow(name="pfp-pipeline")
def pfp_pipeline(workdir: str = str(REPO_ROOT), params: str | None = None) -> dict:
    """Run every stage in order in ``workdir``, then publish and gate the bundles.

    Returns the stage outcomes ("ran" / "skipped"), the seconds of each stage and of the promotion
    step, the final metrics and the promotion decisions. Each stage's output goes to
    ``workdir/logs/STAGE.log``.
    """
    workspace = prepare_workspace(Path(workdir), Path(params) if params else None)
    models = [m.value for m in load_params(workspace / "params.yaml").models]
    log_dir = workspace / console.LOG_DIR
    log_dir.mkdir(exist_ok=True)
    stages = stage_order(models)
    outcomes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    # the DVC stages, then the promotion step (in this process: its output goes to the flow's log)
    progress = console.StageProgress([*stages, PROMOTION_STEP], _terminal.err if _terminal else sys.stderr)
    previous_cwd = Path.cwd()
    os.chdir(workspace)  # the default MLflow store lives in the workspace
    try:
        with tracking.pipeline_run("pipeline", tags={"pfp.workspace": str(workspace)}) as run:
            for stage in stages:
                log_file = console.stage_log(log_dir, stage)
                progress.start(stage, log_file)
                start = time.perf_counter()
                outcomes[stage] = run_dvc_stage(stage, str(workspace), str(log_file))
                seconds[stage] = time.perf_counter() - start
                progress.finish(stage, outcomes[stage], seconds[stage])
            metrics = json.loads((workspace / "metrics" / "evaluate.json").read_text())
            run.log_metrics(headline_metrics(metrics))
            # what the run was: every resolved param (the UI's compare view shows what changed), the
            # params file and the lock, and the data as dataset inputs (digests: the prepared arrays' sha256)
            run.log_params(load_params(workspace / "params.yaml").model_dump(mode="json"))
            run.log_artifact(workspace / "params.yaml")
            run.log_artifact(workspace / "dvc.lock")
            run.log_prepared_datasets(workspace / PREPARED_DIR)
            run.set_tags({f"stage.{stage}": outcome for stage, outcome in outcomes.items()})
            run.log_metrics({f"seconds.{stage}": value for stage, value in seconds.items()})
            # last: register each model's bundle and run the promotion gate (a refusal is not a failure)
            progress.start(PROMOTION_STEP, log_dir / console.FLOW_LOG)
            start = time.perf_counter()
            promotion = publish_and_promote(str(workspace), run.run_id)
            seconds[PROMOTION_STEP] = time.perf_counter() - start
            progress.finish(PROMOTION_STEP, "ran", seconds[PROMOTION_STEP])
    finally:
        progress.close()
        os.chdir(previous_cwd)
    return {"workspace": str(workspace), "stages": outcomes, "seconds": seconds, "metrics": metrics, "promotion": promotion,
            "logs": str(log_dir)}


def _display(path: Path) -> str:
    """``path`` relative to the working folder when it is under it (shorter on the terminal)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    global _terminal
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO_ROOT), help="DVC workspace (default: this repo)")
    parser.add_argument("--params", default=None, help="params file for a separate workdir (default: params.yaml)")
    parser.add_argument("--summary", metavar="PATH", default=None, help="also write the stage outcomes and metrics as JSON here")
    parser.add_argument("--serve", metavar="CRON", default=None, help="serve the flow on this cron schedule instead of running once")
    args = parser.parse_args(argv)
    if args.serve:
        pfp_pipeline.serve(name="pfp-retraining", cron=args.serve, parameters={"workdir": args.workdir, "params": args.params})
        return 0
    log_dir = Path(args.workdir).resolve() / console.LOG_DIR
    flow_log = log_dir / console.FLOW_LOG
    # from here on Prefect, MLflow, warnings and the stages write to the log files; the terminal gets ours
    terminal = _terminal = console.redirect_output(flow_log)
    terminal.err.write(f"pfp pipeline in {_display(Path(args.workdir))}; library logs: {_display(log_dir)}/\n")
    start = time.perf_counter()
    try:
        result = pfp_pipeline(workdir=args.workdir, params=args.params)
    except console.StageFailed as error:
        terminal.err.write(f"\nerror: {error}\n")
        if error.log:
            terminal.err.write(f"--- last lines of {_display(Path(error.log))} ---\n{console.tail(error.log)}\n---\n")
        return 1
    except KeyboardInterrupt:
        terminal.err.write(f"\ninterrupted (the flow's log: {_display(flow_log)})\n")
        return 130
    except Exception as error:
        terminal.err.write(f"\nerror: {type(error).__name__}: {error}\n(the flow's log: {_display(flow_log)})\n")
        return 1
    if args.summary:
        atomic_write_json(args.summary, result)
    steps = {**result["stages"], PROMOTION_STEP: "ran"}
    terminal.out.write("\n" + console.summary_table(steps, result["seconds"], result["metrics"],
                                                  promotion=result["promotion"], workspace=_display(Path(result["workspace"])),
                                                  wall_seconds=time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
