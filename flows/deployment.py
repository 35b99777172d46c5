"""Scheduled retraining: a Prefect deployment of the pipeline flow on a process work pool.

A worker on the pool (``prefect worker start --pool pfp-process``, or ``infra/stack.sh up``) picks
up each scheduled or triggered run and runs the flow in a new process, in the checkout this was
deployed from. The deployment queues its runs (one at a time: ``concurrency_limit`` 1, enqueue).
Needs ``PREFECT_API_URL`` pointing at a Prefect server: a temporary one would vanish with this
process, taking the deployment with it.

    python -m flows.deployment --cron "0 3 * * 0" --workdir runs/scheduled --params params.yaml
    python -m flows.deployment --run --wait   # trigger a run now and follow it to its end

Parameters of the deployment are the flow's (``workdir``, ``params``, ``models``, ``targets``,
``mnist_dir``, ``ood_dir``, ``retries``, ``stage_timeout_minutes``); a run can override any.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from typing import Any
from uuid import UUID

from flows.workspace import REPO_ROOT

POOL = "pfp-process"
DEPLOYMENT = "pfp-retraining"
FLOW_NAME = "pfp-pipeline"
ENTRYPOINT = "flows.pipeline.pfp_pipeline"  # a module path: the worker imports it from the deployed checkout


def _require_server() -> str:
    url = os.environ.get("PREFECT_API_URL") or ""
    if not url:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value() or ""
    if not url:
        raise SystemExit("error: PREFECT_API_URL is not set: a deployment lives on a Prefect server "
                         "(infra/stack.sh up, or prefect server start); set PREFECT_API_URL=http://HOST:PORT/api")
    return url


def ensure_work_pool(name: str = POOL) -> None:
    """Create the process work pool ``name`` unless it exists (with the process worker's default job template)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with_template = WorkPoolCreate(name=name, type="process",
                                           base_job_template=ProcessWorker.get_default_base_job_template())
            try:
                client.create_work_pool(with_template)
            except ObjectAlreadyExists:
                pass


def deploy(*, cron: str | None, parameters: dict[str, Any], pool: str = POOL, name: str = DEPLOYMENT,
           paused: bool = False) -> UUID:
    """Create or update the deployment; returns its id. ``parameters``: the flow's, as defaults of every run."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import pfp_pipeline

    ensure_work_pool(pool)
    source_flow = pfp_pipeline.from_source(source=str(REPO_ROOT), entrypoint="flows/pipeline.py:pfp_pipeline")
    # the worker starts each run in this checkout, with its code importable and analytics off
    job_variables = {"working_dir": str(REPO_ROOT),
                     "env": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)]),
                             "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}}
    with contextlib.redirect_stdout(io.StringIO()):  # Prefect's table of deployments: main() prints one line
        return source_flow.deploy(
            name=name, work_pool_name=pool, cron=cron, paused=paused, parameters=parameters, job_variables=job_variables,
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            build=False, push=False, print_next_steps=False, entrypoint_type=EntrypointType.MODULE_PATH,
            ignore_warnings=True, tags=["pfp"],
            description="Retrain, convert, tune, bundle, evaluate and gate the PFP models when their data or code changed")


def trigger(parameters: dict[str, Any] | None = None, *, name: str = f"{FLOW_NAME}/{DEPLOYMENT}", wait: bool = False,
            timeout: float = 6 * 3600):
    """Start a run of the deployment now; with ``wait``, follow it to its final state. Returns the flow run."""
    from prefect.deployments import run_deployment

    return run_deployment(name, parameters=parameters or {}, timeout=timeout if wait else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=None, help='schedule, e.g. "0 3 * * 0" (Sunday 03:00); none: run on trigger only')
    parser.add_argument("--workdir", default="runs/scheduled", help="the DVC workspace of the scheduled runs (default %(default)s)")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--targets", nargs="+", default=None, help="bundle targets")
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--ood-dir", default=None)
    parser.add_argument("--pool", default=POOL)
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("--run", action="store_true", help="also trigger a run now")
    parser.add_argument("--wait", action="store_true", help="with --run: wait for it and exit non-zero unless it completed")
    args = parser.parse_args(argv)
    url = _require_server()
    relative = {"workdir": args.workdir, "params": args.params, "mnist_dir": args.mnist_dir, "ood_dir": args.ood_dir}
    parameters: dict[str, Any] = {key: os.path.abspath(value) for key, value in relative.items() if value is not None}
    parameters.update({key: value for key, value in (("models", args.models), ("targets", args.targets)) if value})
    deployment_id = deploy(cron=args.cron, parameters=parameters, pool=args.pool, name=args.name)
    print(f"deployment {FLOW_NAME}/{args.name} ({deployment_id}) on pool {args.pool!r} at {url}"
          + (f", schedule {args.cron!r}" if args.cron else ", no schedule"))
    print(f"  a worker runs it: prefect worker start --pool {args.pool}")
    if args.run:
        start = time.monotonic()
        run = trigger(name=f"{FLOW_NAME}/{args.name}", wait=args.wait)
        print(f"flow run {run.name} ({run.id}): {run.state.name if run.state else 'scheduled'}"
              + (f" after {time.monotonic() - start:.0f} s" if args.wait else ""))
        if args.wait and not (run.state and run.state.is_completed()):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
