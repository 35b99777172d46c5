"""MLflow runs: the stage runs, the pipeline run, and the connection to the tracking server.

Default tracking URI: a SQLite database ``mlflow.db`` in the working folder (the DVC
workspace), no server needed; ``MLFLOW_TRACKING_URI`` points it at a server. When the
Prefect flow drives the stages it opens a pipeline run and passes its id in
``PFP_MLFLOW_PARENT_RUN_ID``, so every stage run is nested under it. A tracking server that does
not answer fails a stage within seconds (:func:`check_tracking_server`), naming the URI.

The experiment carries the tag ``mlflow.experimentKind = custom_model_development`` (MLflow 3's
experiment kind: a model-training project). MLflow 3.17's UI chooses its view per browser
("GenAI | Model training", GenAI until the user switches), so the links this module gives
(:func:`experiment_url`, :func:`run_url`) ask for the model-training view. The
tune and benchmark runs record system metrics (``system/cpu_utilization_percentage``,
``system/system_memory_usage_percentage``, ... every :data:`SYSTEM_METRICS_INTERVAL` seconds), so a
noisy measurement shows that the machine was busy.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pfp.config import ConfigError
from pfp.stage import PREPARED_DIR

EXPERIMENT = os.environ.get("PFP_MLFLOW_EXPERIMENT", "pfp-pipeline")
#: seconds one reachability probe of a tracking server may take, and the probes before giving up
CONNECT_TIMEOUT = float(os.environ.get("PFP_MLFLOW_CONNECT_TIMEOUT", "5"))
CONNECT_ATTEMPTS = 3
#: MLflow's own HTTP retries, where the user has not set them: its defaults (7 retries, backoff
#: factor 2, 120 s per request) kept a stage waiting for minutes on a server that had gone away
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PARENT_RUN_ENV = "PFP_MLFLOW_PARENT_RUN_ID"
#: the experiment tag MLflow 3's UI reads to choose an experiment's landing page; our value: the runs table
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: the UI's query parameter for its model-training view (3.17 picks the view per browser, not by the tag above)
UI_WORKFLOW = "workflowType=machine_learning"
#: seconds between system-metric samples (MLflow's default, 10 s, misses most of a short benchmark);
#: MLflow's own MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it
SYSTEM_METRICS_INTERVAL = 2.0
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
    use_experiment(mlflow)
    return mlflow


def use_experiment(mlflow, name: str | None = None) -> str:
    """Create (or find) the experiment ``name`` (default :data:`EXPERIMENT`), make it the active one; its id.

    It gets the experiment kind of a model-training project unless it already has a kind (a
    user's choice in the UI stays).
    """
    name = name or EXPERIMENT
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # another stage created it meanwhile
            pass
        experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None and not experiment.tags.get(EXPERIMENT_KIND_TAG):  # made before this tag, or elsewhere
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return mlflow.set_experiment(name).experiment_id


def experiment_url(experiment_id: str, uri: str | None = None) -> str | None:
    """The MLflow UI link to the experiment's runs table (None: the store has no UI server, e.g. sqlite).

    MLflow 3.17's UI opens ``#/experiments/ID`` on the GenAI view in a browser that has not chosen
    ("GenAI | Model training" in its sidebar, remembered per browser), whatever the experiment's kind;
    ``workflowType=machine_learning`` opens the model-training runs table.
    """
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}"


def run_url(experiment_id: str, run_id: str, uri: str | None = None) -> str | None:
    """The MLflow UI link to one run, in the model-training view (None: no UI server)."""
    base = experiment_url(experiment_id, uri)
    return None if base is None else base.replace(f"/runs?{UI_WORKFLOW}", f"/runs/{run_id}?{UI_WORKFLOW}")


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

    def log_prepared_datasets(self, prepared_dir: str | Path, contexts: Iterable[str] | None = None) -> list[str]:
        """Each split of the prepared data as an MLflow dataset input (``log_input``), digest = its images' sha256.

        The context says what the split is for (training, validation, test, ood); ``contexts``
        keeps only the splits of those contexts (default: all). Returns the split names logged.
        """
        import numpy as np
        from mlflow.data import from_numpy
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        prepared_dir = Path(prepared_dir)
        manifest = json.loads((prepared_dir / "manifest.json").read_text())
        digests = manifest.get("array_sha256", {})
        wanted = None if contexts is None else set(contexts)
        unknown = (wanted or set()) - set(SPLIT_CONTEXTS.values())
        if unknown:
            raise ValueError(f"dataset contexts {sorted(unknown)}: expected some of {sorted(set(SPLIT_CONTEXTS.values()))}")
        with warnings.catch_warnings():  # MLflow registers the local-file source twice, then warns that it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(str(prepared_dir.resolve()))
        logged = []
        with np.load(prepared_dir / "dirty_mnist.npz", allow_pickle=False) as arrays:
            for split in manifest["counts"]:
                context = split_context(split)
                if wanted is not None and context not in wanted:
                    continue
                digest = digests.get(f"{split}_x") or manifest.get("data_hash", "")
                dataset = from_numpy(arrays[f"{split}_x"], targets=arrays[f"{split}_y"], source=source, name=split, digest=digest[:32])
                self._mlflow.log_input(dataset, context=context)
                logged.append(split)
        return logged


#: a prepared split's purpose (its name's last part, ``ood_*``: ood) -> the MLflow dataset context
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test", "ood": "ood"}


def split_context(split: str) -> str:
    """``mnist_train`` -> training, ``ambiguous_val`` -> validation, ``ood_test`` -> ood."""
    purpose = "ood" if split.startswith("ood") else split.rsplit("_", 1)[-1]
    return SPLIT_CONTEXTS.get(purpose, purpose)


def _quiet_system_metrics() -> None:
    # MLflow's monitor logs "Started/Stopping ... system metrics" at INFO on the stage's terminal; warnings still show
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


@contextmanager
def _server_lost(what: str) -> Iterator[None]:
    """Turn MLflow's error when the tracking server went away during ``what`` into :class:`TrackingUnavailable`.

    MLflow raises its own exception (after its HTTP retries) with a long urllib3 message; the stage
    should instead end with one line that names the server, and the flow retries that error
    (flows/pipeline.py ``TRANSIENT_ERRORS``). Errors of a server that still answers pass unchanged.
    """
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as error:
        from mlflow.exceptions import MlflowException

        uri = tracking_uri()
        if not isinstance(error, (MlflowException, OSError)) or not uri.startswith(("http://", "https://")):
            raise
        try:
            check_tracking_server(uri, timeout=2, attempts=1)
        except TrackingUnavailable as gone:
            raise TrackingUnavailable(f"{what}: {gone} (it stopped answering during the run; its outputs are not "
                                      "recorded in dvc.lock, run the stage again when the server is back)") from error
        raise


@contextmanager
def stage_run(stage: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              system_metrics: bool = False, datasets: Iterable[str] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one pipeline stage, nested under the flow's run when there is one.

    ``system_metrics``: sample CPU, memory, disk and network use while the run is open (MLflow's
    system metrics, every :data:`SYSTEM_METRICS_INTERVAL` s; a run shorter than one interval gets none).
    ``datasets``: contexts (training, validation, test, ood) of the prepared splits the stage reads,
    logged as the run's dataset inputs (the MLflow UI's Dataset column).
    """
    mlflow = _mlflow()
    if system_metrics:
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", f"{SYSTEM_METRICS_INTERVAL:g}")
        _quiet_system_metrics()
    parent = os.environ.get(PARENT_RUN_ENV) or None
    base_tags = {"pfp.stage": stage, "git_commit": git_commit()}
    manifest = PREPARED_DIR / "manifest.json"  # written by the prepare stage
    if manifest.is_file():
        base_tags["data_hash"] = json.loads(manifest.read_text()).get("data_hash", "unknown")
    if parent:
        base_tags["mlflow.parentRunId"] = parent
    # tag values must be strings for the REST store (a bool passes SQLite but fails on a server)
    tags = {key: str(value) for key, value in (tags or {}).items()}
    with _server_lost(stage), mlflow.start_run(run_name=stage, tags={**base_tags, **tags}, log_system_metrics=system_metrics) as run:
        handle = StageRun(mlflow, run)
        if params:
            handle.log_params(params)
        if datasets is not None and (PREPARED_DIR / "manifest.json").is_file():  # no data: the stage itself says so
            handle.log_prepared_datasets(PREPARED_DIR, datasets)
        yield handle


@contextmanager
def pipeline_run(name: str, *, tags: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """The parent run of one flow execution; exports its id for the stage processes."""
    mlflow = _mlflow()
    commit = git_commit()
    # git_commit: ours since the first runs; mlflow.source.git.commit: what the MLflow UI shows
    run_tags = {"pfp.stage": "pipeline", "git_commit": commit, "mlflow.source.git.commit": commit, **(tags or {})}
    with _server_lost(f"pipeline run {name}"), mlflow.start_run(run_name=name, tags=run_tags) as run:
        previous = os.environ.get(PARENT_RUN_ENV)
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        try:
            yield StageRun(mlflow, run)
        finally:
            if previous is None:
                os.environ.pop(PARENT_RUN_ENV, None)
            else:
                os.environ[PARENT_RUN_ENV] = previous
