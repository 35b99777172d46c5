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

Scheduled retraining: a deployment of this flow on a Prefect process work pool (flows/deployment.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# The embedded server needs more than Prefect's default 20 s to start on a busy 2-core box;
# telemetry would only fail on these offline machines (DO_NOT_TRACK: the client's, whose first-run
# notice Prefect prints on a terminal when it is imported, before the output goes to the logs).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from flows import artifacts, console, guards, storage  # noqa: E402
from flows.promotion import publish_and_promote  # noqa: E402
from flows.workspace import REPO_ROOT, commit_run, prepare_workspace, stage_env  # noqa: E402
from pfp import tracking  # noqa: E402
from pfp.config import load_params  # noqa: E402
from pfp.io import atomic_write_json, atomic_write_text  # noqa: E402
from pfp.stage import PREPARED_DIR  # noqa: E402
from pfp.stages.report import headline_metrics  # noqa: E402

PER_MODEL_STAGES = ("train", "convert", "calibrate", "tune", "bundle", "evaluate")
# The flow's last step after the DVC stages (flows/promotion.py), as the progress and the summary name it.
PROMOTION_STEP = "publish+promote"
# ... and the very last: commit the run in a separate workspace's git, push its outputs to the DVC remote
STORAGE_STEP = "commit+push"


def stage_order(models: list[str]) -> list[str]:
    stages = ["prepare"]
    for stage in PER_MODEL_STAGES:
        stages += [f"{stage}@{model}" for model in models]
    return stages + ["report", "benchmark"]


# A failed stage is tried again (with backoff) only when its error is one that goes away: a tracking
# server or an RPC board that did not answer. Anything else (bad data, a bug) fails at once.
TRANSIENT_ERRORS = re.compile(r"tracking server does not answer|TrackingUnavailable|RPC (session|server|tracker)|RPCError|"
                              r"[Cc]onnection (refused|reset)|TimeoutError|timed out while|Broken pipe")
DEFAULT_RETRIES = 2
DEFAULT_STAGE_TIMEOUT_MINUTES = 240.0
# DVC's own lines in a stage log: what the Prefect run's log shows of a stage that ran
_DVC_LINE = re.compile(r"^(Running stage|Stage '|Updating lock file|Verifying data sources|ERROR:|WARNING:|"
                       r"'[^']+' didn't change|Data and pipelines are up to date)")


def failure_detail(log_text: str) -> str | None:
    """The line that says why a stage failed: the stage's own ``error:`` line, else DVC's ``ERROR:``."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for prefix in ("error:", "ERROR:"):
        for line in reversed(lines):
            if line.startswith(prefix):
                return line
    return lines[-1] if lines else None


def is_transient(task, task_run, state) -> bool:
    """Prefect's retry condition for stage tasks: retry only failures :data:`TRANSIENT_ERRORS` matches."""
    try:
        state.result()
    except console.StageFailed as error:
        return bool(error.detail and TRANSIENT_ERRORS.search(error.detail))
    except Exception:
        return False
    return False


def _run_logged(command: list[str], workdir: str, env: dict, log_file: str | None, timeout: float | None) -> int | None:
    """Run ``command`` (its output to ``log_file`` when given); None when it ran past ``timeout`` and was killed."""
    log = open(log_file, "w") if log_file else None
    try:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                                   start_new_session=True)  # its own process group: a time-out stops the stage's children too
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return None
        except BaseException:  # the flow was cancelled or interrupted: do not leave the stage running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            raise
    finally:
        if log:
            log.close()


# Where a stage's previous outputs wait while it runs (hard links: no copy), put back if it fails.
KEPT_DIR = Path(".pfp") / "previous"


def stage_outputs(workdir: str | Path, stage: str) -> list[Path]:
    """Every output of ``stage`` (cached or not, metrics and plots too) as DVC's stage graph names it."""
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        (found,) = repo.stage.collect(f"{Path(workdir).resolve() / 'dvc.yaml'}:{stage}")  # DVC resolves targets from the cwd
        return [Path(out.fs_path) for out in found.outs]


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system (an output folder that is a mount point), or no hard links there
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(target))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def previous_outputs_kept(workdir: str | Path, stage: str) -> Iterator[None]:
    """Put ``stage``'s previous outputs back when the block (the stage's run) fails or is interrupted.

    DVC deletes a stage's outputs before it runs the stage, so a stage that fails (a full disk, a
    tracking server gone, killed) would leave none, or a part of new ones, where dvc.lock records
    the previous run's. Kept as hard links (every writer here replaces files, never rewrites
    them in place), so keeping costs no copy; uncached metrics and plots come back too.
    """
    workdir = Path(workdir).resolve()
    kept = workdir / KEPT_DIR / stage.replace("@", "_")
    if kept.exists():  # a run killed while it kept them: that run's stage failed too, these are stale
        shutil.rmtree(kept)
    try:
        declared = stage_outputs(workdir, stage)
    except Exception:  # DVC cannot read the stage: `dvc repro` will say why, in the stage's log
        yield
        return
    outputs = [path for path in declared if path.exists()]
    for path in outputs:
        _link_tree(path, kept / path.relative_to(workdir))
    try:
        yield
    except BaseException:
        for path in declared:
            _remove(path)  # whatever the failed run left (DVC may have cached none of it)
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(kept / path.relative_to(workdir), path)  # a rename, or a copy across file systems
        raise
    finally:
        shutil.rmtree(kept, ignore_errors=True)


class _StageExit(Exception):
    """A stage's non-zero exit inside :func:`previous_outputs_kept` (so its outputs are put back)."""


@task(name="dvc-stage", task_run_name="{stage}")
def run_dvc_stage(stage: str, workdir: str, log_file: str | None = None, timeout_minutes: float | None = None,
                  board_key: str | None = None) -> str:
    """Reproduce one stage; returns "ran" or "skipped" (DVC found nothing changed).

    With ``log_file`` the stage's whole output (DVC's, the stage process's and its libraries')
    goes there, not to the terminal; DVC's lines, and on failure the log's end, also go to this
    task's Prefect log, so a failed run shows its cause in the Prefect UI and API. A failure (or
    a stage past ``timeout_minutes``, then stopped) raises :class:`flows.console.StageFailed`.
    ``board_key``: the RPC board key the stage measures on; the stage waits for the key's slot.
    """
    logger = get_run_logger()
    env = stage_env(stage)
    status = subprocess.run(["dvc", "status", "--json", stage], cwd=workdir, env=env, capture_output=True, text=True)
    changed = status.returncode != 0 or json.loads(status.stdout or "{}") != {}
    timeout = timeout_minutes * 60 if timeout_minutes else None
    returncode: int | None = 0
    with guards.board_slot(board_key if changed else None), contextlib.suppress(_StageExit):
        with previous_outputs_kept(workdir, stage) if changed else contextlib.nullcontext():
            returncode = _run_logged(["dvc", "repro", "--single-item", stage], workdir, env, log_file, timeout)
            if returncode != 0:
                raise _StageExit
    log_text = console.tail(log_file, 200) if log_file else ""
    if returncode != 0:
        detail = (f"timed out after {timeout_minutes:g} min and was stopped" if returncode is None
                  else failure_detail(log_text))
        logger.error("stage %s failed: %s\n--- last lines of %s ---\n%s", stage, detail, log_file,
                     "\n".join(log_text.splitlines()[-60:]))
        raise console.StageFailed(stage, -1 if returncode is None else returncode, log_file, detail)
    dvc_lines = [line for line in log_text.splitlines() if _DVC_LINE.match(line)]
    outcome = "ran" if changed else "skipped"
    logger.info("stage %s: %s%s", stage, outcome, "".join(f"\n  {line}" for line in dvc_lines))
    return outcome


@task(name="commit+push", retries=2, retry_delay_seconds=[10, 30])
def commit_and_push(workspace: str, message: str) -> dict:
    """Commit the run (a separate workspace's git: params, dvc.lock, metrics) and push its outputs to the DVC remote.

    Retried: a remote on a network may not answer for a moment. A push that still fails fails the
    run (the outputs are safe in the workspace; ``dvc push`` there sends them later).
    """
    logger = get_run_logger()
    commit = commit_run(Path(workspace), message)
    pushed = storage.push(workspace)
    logger.info("workspace commit %s; dvc push to %s (%s): %d objects sent", commit or "-", pushed["remote"], pushed["url"],
                pushed["pushed"])
    return {**pushed, "commit": commit}


def pipeline_up_to_date(workspace: Path) -> bool:
    """True when DVC finds no stage whose inputs changed (one ``dvc status`` over the whole pipeline)."""
    status = subprocess.run(["dvc", "status", "--json"], cwd=workspace, env=stage_env(), capture_output=True, text=True)
    return status.returncode == 0 and json.loads(status.stdout or "{}") == {}


def requested_params(workdir: Path, params: str | None, overrides: dict[str, Any]) -> Path | None:
    """The params file this run asks for: ``params`` with the deployment's overrides applied.

    Overrides are dotted keys (``models``, ``bundle.targets``, ``data.mnist_dir``); with any, the
    merged file is written to ``WORKDIR/.pfp/requested-params.yaml`` (the workspace then resolves it).
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if not overrides:
        return Path(params) if params else None
    if workdir.resolve() == REPO_ROOT:
        raise ValueError(f"overrides {sorted(overrides)}: the repo workspace always uses params.yaml; give a workdir")
    source = Path(params) if params else REPO_ROOT / "params.yaml"
    values = yaml.safe_load(source.read_text()) or {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = str(Path(value).resolve()) if dotted.startswith("data.") else value
    target = workdir / ".pfp" / "requested-params.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, yaml.safe_dump(values, sort_keys=False))
    load_params(target)  # refuse a bad override here, naming the key
    return target


# The terminal of the flow run (progress bar), when main() has sent the process's output to a log file.
_terminal: console.Console | None = None


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


@flow(name="pfp-pipeline")
def pfp_pipeline(workdir: str = str(REPO_ROOT), params: str | None = None, models: list[str] | None = None,
                 targets: list[str] | None = None, mnist_dir: str | None = None, ood_dir: str | None = None,
                 remote: str | None = None, retries: int = DEFAULT_RETRIES,
                 stage_timeout_minutes: float = DEFAULT_STAGE_TIMEOUT_MINUTES) -> dict:
    """Run every stage in order in ``workdir``, then publish and gate the bundles.

    ``params``: the params file (default: the repo's params.yaml); ``models``, ``targets`` (bundle
    targets), ``mnist_dir`` and ``ood_dir`` override its keys. ``remote``: the DVC remote (URL or
    folder) a successful run pushes its outputs to (default: ``$PFP_DVC_REMOTE``, else the workspace's
    default remote, else ``WORKDIR.dvc-storage`` beside it; flows/storage.py). A stage whose error is transient
    (tracking server, RPC) is retried ``retries`` times with backoff; a stage running longer than
    ``stage_timeout_minutes`` is stopped. When nothing changed since the last run, every stage is
    skipped after one ``dvc status``, with no MLflow run and no promotion.

    Returns the stage outcomes ("ran" / "skipped"), the seconds of each stage and of the promotion
    step, the final metrics and the promotion decisions. Each stage's output goes to
    ``workdir/logs/STAGE.log``.
    """
    workdir_path = Path(workdir).resolve()
    with guards.workspace_lock(workdir_path, flow_run=_flow_run_id()):
        return _run_pipeline(workdir_path, params, {"models": models, "bundle.targets": targets, "data.mnist_dir": mnist_dir,
                                                    "data.ood_dir": ood_dir}, remote, retries, stage_timeout_minutes)


def _run_pipeline(workdir: Path, params: str | None, overrides: dict, remote: str | None, retries: int,
                  stage_timeout_minutes: float) -> dict:
    logger = get_run_logger()
    params_file = requested_params(workdir, params, overrides)
    workspace = prepare_workspace(workdir, params_file, remote)
    resolved = load_params(workspace / "params.yaml")
    models = [m.value for m in resolved.models]
    board_key = resolved.tune.rpc.key if resolved.tune.rpc.tracker else None
    log_dir = workspace / console.LOG_DIR
    log_dir.mkdir(exist_ok=True)
    stages = stage_order(models)
    outcomes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    metrics_file = workspace / "metrics" / "evaluate.json"
    # the DVC stages, then the promotion step (in this process: its output goes to the flow's log)
    progress = console.StageProgress([*stages, PROMOTION_STEP, STORAGE_STEP], _terminal.err if _terminal else sys.stderr)
    if metrics_file.is_file() and pipeline_up_to_date(workspace):
        # nothing to retrain, nothing new to register: no stage process, no MLflow run, no promotion
        logger.info("nothing changed since the last run (dvc status): every stage skipped")
        for step in [*stages, PROMOTION_STEP, STORAGE_STEP]:
            progress.start(step, log_dir / console.FLOW_LOG)
            progress.finish(step, "skipped", 0.0)
        progress.close()
        outcomes = dict.fromkeys(stages, "skipped")
        metrics = json.loads(metrics_file.read_text())
        artifacts.publish(metrics=headline_metrics(metrics), promotion=None, stages=outcomes, seconds={})
        return {"workspace": str(workspace), "stages": outcomes, "seconds": {}, "metrics": metrics, "promotion": {},
                "storage": {}, "logs": str(log_dir), "up_to_date": True}
    previous_cwd = Path.cwd()
    os.chdir(workspace)  # the default MLflow store lives in the workspace
    try:
        with tracking.pipeline_run("pipeline", tags={"pfp.workspace": str(workspace)}) as run:
            for stage in stages:
                log_file = console.stage_log(log_dir, stage)
                progress.start(stage, log_file)
                start = time.perf_counter()
                stage_task = run_dvc_stage.with_options(
                    name=stage, retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                    retry_jitter_factor=0.5, retry_condition_fn=is_transient)
                outcomes[stage] = stage_task(stage, str(workspace), str(log_file), stage_timeout_minutes,
                                             board_key if stage.startswith("tune@") else None)
                seconds[stage] = time.perf_counter() - start
                progress.finish(stage, outcomes[stage], seconds[stage])
            metrics = json.loads(metrics_file.read_text())
            run.log_metrics(headline_metrics(metrics))
            # what the run was: every resolved param (the UI's compare view shows what changed), the
            # params file and the lock, and the data as dataset inputs (digests: the prepared arrays' sha256)
            run.log_params(resolved.model_dump(mode="json"))
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
            artifacts.publish(metrics=headline_metrics(metrics), promotion=promotion, stages=outcomes, seconds=seconds,
                              tracking_uri=tracking.tracking_uri(), run_id=run.run_id)
            # shared storage: a fresh clone of the workspace + `dvc pull` gets every output of this run
            progress.start(STORAGE_STEP, log_dir / console.FLOW_LOG)
            start = time.perf_counter()
            stored = commit_and_push(str(workspace), f"pfp pipeline run {run.run_id}")
            run.set_tags({"dvc.remote": stored["url"], **({"workspace.commit": stored["commit"]} if stored["commit"] else {})})
            seconds[STORAGE_STEP] = time.perf_counter() - start
            progress.finish(STORAGE_STEP, "ran", seconds[STORAGE_STEP])
    finally:
        progress.close()
        os.chdir(previous_cwd)
    return {"workspace": str(workspace), "stages": outcomes, "seconds": seconds, "metrics": metrics, "promotion": promotion,
            "storage": stored, "logs": str(log_dir), "up_to_date": False}


def _display(path: Path) -> str:
    """``path`` relative to the working folder when it is under it (shorter on the terminal)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO_ROOT), help="DVC workspace (default: this repo)")
    parser.add_argument("--params", default=None, help="params file for a separate workdir (default: params.yaml)")
    parser.add_argument("--summary", metavar="PATH", default=None, help="also write the stage outcomes and metrics as JSON here")
    parser.add_argument("--models", nargs="+", default=None, help="override the params file's models")
    parser.add_argument("--targets", nargs="+", default=None, help="override bundle.targets (host, rasp4b, ...)")
    parser.add_argument("--mnist-dir", default=None, help="override data.mnist_dir")
    parser.add_argument("--ood-dir", default=None, help="override data.ood_dir")
    parser.add_argument("--remote", default=None, help="DVC remote URL or folder to push the outputs to (default: "
                        "$PFP_DVC_REMOTE, else the workspace's default remote, else WORKDIR.dvc-storage)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries of a stage with a transient error")
    parser.add_argument("--stage-timeout", type=float, default=DEFAULT_STAGE_TIMEOUT_MINUTES, metavar="MINUTES",
                        help="stop a stage that runs longer (default %(default)s)")
    args = parser.parse_args(argv)
    # the workspace is ours before anything in it changes: a second run started at the same time
    # would otherwise truncate this run's flow log (and rewrite params and code) before it is refused
    try:
        with guards.workspace_lock(Path(args.workdir)):
            return _main(args)
    except guards.WorkspaceBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 3


def _main(args: argparse.Namespace) -> int:
    global _terminal
    log_dir = Path(args.workdir).resolve() / console.LOG_DIR
    flow_log = log_dir / console.FLOW_LOG
    # from here on Prefect, MLflow, warnings and the stages write to the log files; the terminal gets ours
    terminal = _terminal = console.redirect_output(flow_log)
    terminal.err.write(f"pfp pipeline in {_display(Path(args.workdir))}; library logs: {_display(log_dir)}/\n")
    start = time.perf_counter()
    try:
        result = pfp_pipeline(workdir=args.workdir, params=args.params, models=args.models, targets=args.targets,
                              mnist_dir=args.mnist_dir, ood_dir=args.ood_dir, remote=args.remote, retries=args.retries,
                              stage_timeout_minutes=args.stage_timeout)
    except console.StageFailed as error:
        terminal.err.write(f"\nerror: {error}\n")
        if error.log:
            terminal.err.write(f"--- last lines of {_display(Path(error.log))} ---\n{console.tail(error.log)}\n---\n")
        return 1
    except guards.WorkspaceBusy as error:
        terminal.err.write(f"\nerror: {error}\n")
        return 3
    except KeyboardInterrupt:
        terminal.err.write(f"\ninterrupted (the flow's log: {_display(flow_log)})\n")
        return 130
    except Exception as error:
        terminal.err.write(f"\nerror: {type(error).__name__}: {error}\n(the flow's log: {_display(flow_log)})\n")
        return 1
    if args.summary:
        atomic_write_json(args.summary, result)
    steps = {**result["stages"], **dict.fromkeys((PROMOTION_STEP, STORAGE_STEP), "skipped" if result["up_to_date"] else "ran")}
    terminal.out.write("\n" + console.summary_table(steps, result["seconds"], result["metrics"],
                                                  promotion=result["promotion"], workspace=_display(Path(result["workspace"])),
                                                  wall_seconds=time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
