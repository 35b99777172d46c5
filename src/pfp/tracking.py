"""MLflow runs: the stage runs, the pipeline run, and the connection to the tracking server.

Default tracking URI: a SQLite database ``mlflow.db`` in the working folder (the DVC
workspace), no server needed; ``MLFLOW_TRACKING_URI`` points it at a server. When the
Prefect flow drives the stages it opens a pipeline run and passes its id in
``PFP_MLFLOW_PARENT_RUN_ID``, so every stage run is nested under it. A tracking server that does
not answer fails a stage within seconds (:func:`check_tracking_server`), naming the URI.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pfp.config import ConfigError

EXPERIMENT = os.environ.get("PFP_MLFLOW_EXPERIMENT", "pfp-pipeline")
#: seconds one reachability probe of a tracking server may take, and the probes before giving up
CONNECT_TIMEOUT = float(os.environ.get("PFP_MLFLOW_CONNECT_TIMEOUT", "5"))
CONNECT_ATTEMPTS = 3
#: MLflow's own HTTP retries, where the user has not set them: its defaults (7 retries, backoff
#: factor 2, 120 s per request) kept a stage waiting for minutes on a server that had gone away
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PARENT_RUN_ENV = "PFP_MLFLOW_PARENT_RUN_ID"
GIT_COMMIT_ENV = "PFP_GIT_COMMIT"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit(folder: str | Path = ".") -> str:
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (MLflow params and metrics are flat)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _key(name: str) -> str:
    # MLflow keys allow [A-Za-z0-9_-. :/]; stage names carry DVC's "@".
    return name.replace("@", ":")


class TrackingUnavailable(ConfigError):
    """The configured MLflow tracking server does not answer."""


def check_tracking_server(uri: str, *, timeout: float = CONNECT_TIMEOUT, attempts: int = CONNECT_ATTEMPTS) -> None:
    """Raise :class:`TrackingUnavailable` naming ``uri`` when an http(s) tracking server does not answer ``/health``.

    A few short probes (a server starting up, a network blip), then a clear error instead of
    MLflow's minutes of silent retries. Other stores (sqlite, file) need no server.
    """
    if not uri.startswith(("http://", "https://")):
        return
    error: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as failure:
            if failure.code < 500:  # it answers (e.g. /health behind an auth proxy)
                return
            error = failure
        except (OSError, ValueError) as failure:  # refused, unreachable, timed out, bad URL
            error = failure
        if attempt + 1 < attempts:
            time.sleep(1.0 * (attempt + 1))
    reason = getattr(error, "reason", None) or error
    raise TrackingUnavailable(f"MLFLOW_TRACKING_URI={uri}: the MLflow tracking server does not answer ({reason}; "
                              f"{attempts} tries). Start it (infra/mlflow-server.sh), or unset MLFLOW_TRACKING_URI to "
                              "log to mlflow.db in the workspace")


def _mlflow():
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_tracking_server(tracking_uri())
    import mlflow  # slow import: only where tracking happens

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        try:
            mlflow.create_experiment(EXPERIMENT)
        except Exception:  # another stage created it meanwhile
            pass
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


class StageRun:
    """Thin handle on an active MLflow run."""

    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[start : start + 100]))

    def log_metrics(self, values: Mapping[str, Any], step: int | None = None) -> None:
        numeric = {_key(k): float(v) for k, v in flatten(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numeric:
            self._mlflow.log_metrics(numeric, step=step)

    def log_metric_series(self, name: str, values: list[float]) -> None:
        for step, value in enumerate(values):
            self._mlflow.log_metric(name, float(value), step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({_key(k): str(v) for k, v in tags.items()})

    def log_prepared_datasets(self, prepared_dir: str | Path) -> list[str]:
        """Each split of the prepared data as an MLflow dataset input (``log_input``), digest = its images' sha256.

        The context says what the split is for (training, validation, test, ood); returns the split names.
        """
        import numpy as np
        from mlflow.data import from_numpy

        prepared_dir = Path(prepared_dir)
        manifest = json.loads((prepared_dir / "manifest.json").read_text())
        digests = manifest.get("array_sha256", {})
        logged = []
        with np.load(prepared_dir / "dirty_mnist.npz", allow_pickle=False) as arrays:
            for split in manifest["counts"]:
                digest = digests.get(f"{split}_x") or manifest.get("data_hash", "")
                dataset = from_numpy(arrays[f"{split}_x"], targets=arrays[f"{split}_y"], source=str(prepared_dir.resolve()),
                                     name=split, digest=digest[:32])
                purpose = "ood" if split.startswith("ood") else split.rsplit("_", 1)[-1]
                context = {"train": "training", "val": "validation", "test": "test"}.get(purpose, purpose)
                self._mlflow.log_input(dataset, context=context)
                logged.append(split)
        return logged


@contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one pipeline stage, nested under the flow's run when there is one."""
    mlflow = _mlflow()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    base_tags = {"pfp.stage": stage, "git_commit": git_commit()}
    manifest = Path("data/prepared/manifest.json")  # written by the prepare stage
    if manifest.is_file():
        base_tags["data_hash"] = json.loads(manifest.read_text()).get("data_hash", "unknown")
    if parent:
        base_tags["mlflow.parentRunId"] = parent
    # tag values must be strings for the REST store (a bool passes SQLite but fails on a server)
    tags = {key: str(value) for key, value in (tags or {}).items()}
    with mlflow.start_run(run_name=stage, tags={**base_tags, **tags}) as run:
        handle = StageRun(mlflow, run)
        if params:
            handle.log_params(params)
        yield handle


@contextmanager
def pipeline_run(name: str, *, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """The parent run of one flow execution; exports its id for the stage processes."""
    mlflow = _mlflow()
    commit = git_commit()
    # git_commit: ours since the first runs; mlflow.source.git.commit: what the MLflow UI shows
    run_tags = {"pfp.stage": "pipeline", "git_commit": commit, "mlflow.source.git.commit": commit, **(tags or {})}
    with mlflow.start_run(run_name=name, tags=run_tags) as run:
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield StageRun(mlflow, run)
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
