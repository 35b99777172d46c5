"""The model registry and the promotion gate.

One registered model per architecture (``pfp-mlp``, ``pfp-lenet``). Every version carries its
evaluation as version tags (``pfp.metric.accuracy`` ... ``pfp.metric.latency_b1_ms``), so the
gate reads the champion's figures from the registry, not from local files. A new version gets
the alias ``challenger``; :func:`promote` compares it with the version holding ``champion``
(:class:`pfp.config.PromoteConfig` limits) and moves ``champion`` only when no check fails. The
first version of a model becomes champion by default; a refused challenger is a decision, not an
error (the champion stays where it was).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pfp.config import PromoteConfig

__all__ = ["CHALLENGER", "CHAMPION", "Check", "Evaluation", "GateDecision", "bundle_sha256", "compare", "evaluation_from_metrics",
           "find_version", "log_decision", "promote", "publish_bundle", "register_version", "registered_name", "version_evaluation"]

CHALLENGER, CHAMPION = "challenger", "champion"
METRIC_TAG = "pfp.metric."
BUNDLE_TAG = "pfp.bundle_sha256"
MODEL_TAG = "pfp.model"


def registered_name(model: str) -> str:
    """The registered model of an architecture: ``pfp-mlp``, ``pfp-lenet``."""
    return f"pfp-{getattr(model, 'value', model)}"


@dataclass(frozen=True)
class Evaluation:
    """What the gate compares: the PFP method's test figures and its compiled latency at batch 1 (None: not measured)."""

    accuracy: float
    nll: float
    ece: float
    auroc_mi: float
    latency_b1_ms: float | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and not math.isfinite(value):
                raise ValueError(f"evaluation: {key} = {value} is not a finite number")

    def to_tags(self) -> dict[str, str]:
        return {f"{METRIC_TAG}{key}": repr(float(value)) for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], where: str = "model version") -> "Evaluation":
        values: dict[str, float | None] = {}
        for key in ("accuracy", "nll", "ece", "auroc_mi", "latency_b1_ms"):
            raw = tags.get(f"{METRIC_TAG}{key}")
            if raw is None and key != "latency_b1_ms":
                raise ValueError(f"{where}: tag {METRIC_TAG}{key} missing; it was not registered by pfp.registry.register_version")
            values[key] = None if raw is None else float(raw)
        return cls(**values)


def evaluation_from_metrics(evaluate: Mapping[str, Any], latency: Mapping[str, Any] | None, model: str) -> Evaluation:
    """The gate's figures of ``model`` from ``metrics/evaluate.json`` and ``metrics/latency.json`` (parsed; None: no benchmark)."""
    try:
        pfp = evaluate[model]["pfp"]
    except KeyError:
        raise ValueError(f"evaluate metrics: no pfp figures for model {model!r} (run evaluate@{model} and report)") from None
    missing = [key for key in ("accuracy", "nll", "ece", "auroc_mi") if key not in pfp]
    if missing:
        raise ValueError(f"evaluate metrics of {model}: missing {', '.join(missing)}")
    latency_ms = ((latency or {}).get(model) or {}).get("batch_1", {}).get("pfp_tvm_ms")
    return Evaluation(accuracy=float(pfp["accuracy"]), nll=float(pfp["nll"]), ece=float(pfp["ece"]), auroc_mi=float(pfp["auroc_mi"]),
                      latency_b1_ms=None if latency_ms is None else float(latency_ms))


@dataclass(frozen=True)
class Check:
    """One comparison of the gate: the figures, the limit the challenger must meet, and the outcome."""

    name: str
    challenger: float | None
    champion: float | None
    limit: float | None  # the challenger's allowed bound (a minimum for higher-is-better figures)
    rule: str  # how the limit was made, e.g. ">= champion - 0.005"
    status: str  # "pass", "fail" or "skipped" (a figure is missing)

    @property
    def failed(self) -> bool:
        return self.status == "fail"


#: name -> (higher is better, PromoteConfig field); latency is a ratio, the others a difference
_CHECKS = (("accuracy", True, "max_accuracy_drop"), ("nll", False, "max_nll_rise"), ("ece", False, "max_ece_rise"),
           ("auroc_mi", True, "max_auroc_drop"))


def compare(challenger: Evaluation, champion: Evaluation, config: PromoteConfig) -> list[Check]:
    """Every check of the gate, in order: accuracy, NLL, ECE, OOD AUROC (MI), latency at batch 1."""
    checks = []
    for name, higher_better, knob in _CHECKS:
        new, old, tolerance = getattr(challenger, name), getattr(champion, name), getattr(config, knob)
        if higher_better:
            limit, passed, rule = old - tolerance, new >= old - tolerance, f">= champion - {tolerance:g}"
        else:
            limit, passed, rule = old + tolerance, new <= old + tolerance, f"<= champion + {tolerance:g}"
        checks.append(Check(name, new, old, limit, rule, "pass" if passed else "fail"))
    new, old, ratio = challenger.latency_b1_ms, champion.latency_b1_ms, config.max_latency_ratio
    if new is None or old is None:
        status = "fail" if config.require_latency else "skipped"
        checks.append(Check("latency_b1_ms", new, old, None, f"<= champion x {ratio:g} (a figure is missing)", status))
    else:
        checks.append(Check("latency_b1_ms", new, old, old * ratio, f"<= champion x {ratio:g}", "pass" if new <= old * ratio else "fail"))
    return checks


@dataclass(frozen=True)
class GateDecision:
    """The gate's outcome for one model version."""

    model: str
    registered_model: str
    version: str
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    reason: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed_checks(self) -> list[str]:
        return [check.name for check in self.checks if check.failed]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "registered_model": self.registered_model, "version": self.version,
                "champion_before": self.champion_before, "champion_after": self.champion_after, "promoted": self.promoted,
                "reason": self.reason, "failed_checks": self.failed_checks, "checks": [asdict(check) for check in self.checks]}

    def table(self) -> str:
        """The decision and its checks as a small text table."""
        def number(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        head = (f"{self.registered_model} v{self.version}: {'PROMOTED to champion' if self.promoted else 'not promoted'} "
                f"({self.reason}); champion v{self.champion_after or '-'}")
        if not self.checks:
            return head
        rows = [("check", "challenger", "champion", "limit", "rule", "result")]
        rows += [(c.name, number(c.challenger), number(c.champion), number(c.limit), c.rule, c.status) for c in self.checks]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        return "\n".join([head, *lines])


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 120.0) -> ModelVersion:
    deadline = time.monotonic() + timeout
    while True:
        current = client.get_model_version(name, version)
        if current.status == "READY":
            return current
        if current.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"{name} v{version}: registration {current.status} ({current.status_message or 'no message'})")
        time.sleep(0.5)


def find_version(client: MlflowClient, model: str, bundle_sha256: str) -> ModelVersion | None:
    """The registered version of ``model`` made from the bundle with this checksum, if any (the newest)."""
    name = registered_name(model)
    found = [version for version in client.search_model_versions(f"name = '{name}'")
             if version.tags.get(BUNDLE_TAG) == bundle_sha256]
    return max(found, key=lambda version: int(version.version)) if found else None


def register_version(client: MlflowClient, model: str, model_uri: str, evaluation: Evaluation, *, run_id: str | None = None,
                     model_id: str | None = None, bundle_sha256: str | None = None,
                     tags: Mapping[str, Any] | None = None) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``pfp-MODEL`` carrying ``evaluation``, and give it the alias ``challenger``."""
    name = registered_name(model)
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, tags={MODEL_TAG: str(model)},
                                           description=f"PFP bundle of the {model} BNN (pfp_runtime); aliases champion and challenger")
        except MlflowException as race:  # created meanwhile by another process
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    version_tags = {MODEL_TAG: str(model), **evaluation.to_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    if bundle_sha256:
        version_tags[BUNDLE_TAG] = bundle_sha256
    created = client.create_model_version(name, model_uri, run_id=run_id, tags=version_tags, model_id=model_id)
    version = _wait_ready(client, name, created.version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def version_evaluation(client: MlflowClient, model: str, version: str) -> Evaluation:
    """The evaluation a registered version carries (its tags)."""
    name = registered_name(model)
    return Evaluation.from_tags(client.get_model_version(name, version).tags, f"{name} v{version}")


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        # no such alias yet: INVALID_PARAMETER_VALUE "Registered model alias champion not found"
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or (error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in error.message):
            return None
        raise


def promote(client: MlflowClient, model: str, version: str | None = None, config: PromoteConfig | None = None) -> GateDecision:
    """Run the gate on ``version`` (default: the ``challenger``) and move ``champion`` to it when every check passes."""
    config = config or PromoteConfig()
    name = registered_name(model)
    if version is None:
        version = client.get_model_version_by_alias(name, CHALLENGER).version
    version = str(version)
    challenger = version_evaluation(client, model, version)
    current = _champion(client, name)
    if current is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return GateDecision(str(model), name, version, None, version, True, "first version: champion by default")
    if current.version == version:
        return GateDecision(str(model), name, version, version, version, False, "already the champion")
    champion = Evaluation.from_tags(current.tags, f"{name} v{current.version} (champion)")
    checks = compare(challenger, champion, config)
    failed = [check.name for check in checks if check.failed]
    if failed:
        return GateDecision(str(model), name, version, current.version, current.version, False,
                            f"refused: {', '.join(failed)} outside the limits", checks)
    client.set_registered_model_alias(name, CHAMPION, version)
    return GateDecision(str(model), name, version, current.version, version, True, "every check passed", checks)


def log_decision(client: MlflowClient, run_id: str, decision: GateDecision) -> None:
    """Record the decision on the run: params, one metric per figure and check, ``promotion/MODEL.json``, a tag."""
    from mlflow.entities import Metric, Param

    prefix = f"promote.{decision.model}"
    params = {"version": decision.version, "champion_before": decision.champion_before or "none",
              "decision": "promoted" if decision.promoted else "kept", "reason": decision.reason[:500]}
    metrics = {"promoted": float(decision.promoted)}
    for check in decision.checks:
        metrics[f"{check.name}.passed"] = float(check.status != "fail")
        for role in ("challenger", "champion", "limit"):
            value = getattr(check, role)
            if value is not None:
                metrics[f"{check.name}.{role}"] = float(value)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"{prefix}.{key}", value, now, 0) for key, value in metrics.items()],
                     params=[Param(f"{prefix}.{key}", value) for key, value in params.items()])
    client.log_dict(run_id, decision.to_dict(), f"promotion/{decision.model}.json")
    client.set_tag(run_id, f"{prefix}.decision", params["decision"])


def bundle_sha256(bundle_dir: str | Path) -> str:
    """The identity of a bundle folder: the sha256 of its ``SHA256SUMS`` (which lists the sha256 of every other file)."""
    from pfp_runtime import CHECKSUM_FILE, BundleError
    from pfp_runtime.bundle import file_sha256

    sums = Path(bundle_dir) / CHECKSUM_FILE
    if not sums.is_file():
        raise BundleError(f"{sums}: checksum file missing; {bundle_dir} is not a complete bundle")
    return file_sha256(sums)


def publish_bundle(client: MlflowClient, model: str, bundle_dir: str | Path, evaluation: Evaluation, images: np.ndarray, *,
                   run_id: str, config: PromoteConfig | None = None) -> GateDecision:
    """Log the bundle as an MLflow model of the active run ``run_id``, register it, run the gate and record the decision.

    A bundle already registered (same checksums) is not registered again: the gate runs on its version.
    """
    from pfp.mlflow_model import log_bundle_model

    sha = bundle_sha256(bundle_dir)
    existing = find_version(client, model, sha)
    if existing is not None:
        version = existing.version
    else:
        info = log_bundle_model(bundle_dir, images=images, tags={"pfp.bundle_sha256": sha})
        version = register_version(client, model, info.model_uri, evaluation, run_id=run_id, model_id=info.model_id,
                                   bundle_sha256=sha).version
    decision = promote(client, model, version, config)
    log_decision(client, run_id, decision)
    return decision
