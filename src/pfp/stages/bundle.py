"""Stage ``bundle@MODEL``: the deployable bundle per target -> models/MODEL/bundle/TARGET/, metrics/bundle_MODEL.json.

The host bundle is built first and chooses the OOD threshold on the MNIST validation split
(:data:`THRESHOLD_SPLIT`: clean in-distribution digits, never OOD or ambiguous images; see
:func:`pfp.bundle.ood_threshold`); the boards' bundles take the same threshold. Batch sizes the tune stage tuned for a target compile with its tuning database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfp.artifacts.trained import load_trained, trained_digests
from pfp.bundle import BuiltBundle, build_bundle
from pfp.config import BundleConfig, CompileTarget, TuneParams, Variant
from pfp.data.dirty_mnist import load_prepared
from pfp.io import atomic_write_json
from pfp.stage import METRICS_DIR, PREPARED_DIR, bundle_dir, tvm_dir

__all__ = ["THRESHOLD_SPLIT", "BundleOutcome", "run", "summary_path", "tuning_databases"]

#: the prepared split the OOD threshold is chosen on: its images count as the positives (accepted)
THRESHOLD_SPLIT = "mnist_val"


def summary_path(model: str) -> Path:
    return METRICS_DIR / f"bundle_{model}.json"


def tuning_databases(model: str, target: CompileTarget, batch_sizes: list[int], tune: TuneParams,
                     variant: Variant = Variant.PFP) -> dict[int, Path]:
    """Batch size -> the tune stage's database folder of the model's PFP ``variant`` (``pfp`` or
    ``pfp_cov``), where it tuned that size for ``target``."""
    if target is not tune.target or variant not in tune.variants:
        return {}
    found = {}
    for batch in batch_sizes:
        folder = tvm_dir(model) / target.value / f"{variant.value}_b{batch}"
        if batch in tune.batch_sizes and folder.is_dir():
            found[batch] = folder
    return found


@dataclass
class BundleOutcome:
    bundles: dict[str, BuiltBundle]  # target -> what was written
    summary: dict
    summary_path: Path


def run(model: str, config: BundleConfig, tune: TuneParams, *, seed: int) -> BundleOutcome:
    """Build ``model``'s bundles (in the DVC workspace, the working folder)."""
    trained = load_trained(model)
    calibration = trained.calibration
    arrays = load_prepared(PREPARED_DIR)
    validation = arrays[f"{THRESHOLD_SPLIT}_x"]
    targets = [CompileTarget.HOST] + [t for t in config.targets if t is not CompileTarget.HOST]
    bundles: dict[str, BuiltBundle] = {}
    threshold = None
    for target in targets:
        print(f"[bundle] {model} {target.value}: batch sizes {config.batch_sizes}", flush=True)
        built = build_bundle(
            trained.pfp_model, bundle_dir(model, target.value), target=target.value, batch_sizes=config.batch_sizes,
            temperature=calibration.temperature, variance_scale=calibration.variance_scale,
            head_draw_count=config.head_draws, seed=seed, ood_score=config.ood_score.value,
            ood_target_tpr=config.ood_target_tpr, validation_images=validation if threshold is None else None,
            validation_name=THRESHOLD_SPLIT,
            threshold=threshold, databases=tuning_databases(model, target, config.batch_sizes, tune,
                                                                 Variant(trained.pfp_model.pfp_variant)),
            made_from=trained_digests(model))
        threshold = built.metadata["ood"]["threshold"]
        bundles[target.value] = built
    host = bundles[CompileTarget.HOST.value].metadata
    summary = {"ood": host["ood"], "targets": {
        name: {"folder": str(built.folder), "seconds": built.seconds, "schedules": built.metadata["schedules"],
               "bytes": sum(path.stat().st_size for path in built.folder.iterdir())}
        for name, built in bundles.items()}}
    atomic_write_json(summary_path(model), summary)
    return BundleOutcome(bundles, summary, summary_path(model))
