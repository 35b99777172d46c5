"""Typed pipeline parameters, loaded from ``params.yaml`` and validated once.

Every stage reads its section through :func:`load_params`; a bad value fails here with
the offending key named (``train.mlp.epochs: must be >= 0``), never deep inside a stage.
"""

from __future__ import annotations

import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pfp.backends.base import Backend
from pfp.backends.tvm.targets import TargetName
from pfp.spec import Architecture, PoolRule


class ConfigError(ValueError):
    """A parameter file is missing, unreadable or holds an invalid value."""


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number or a list of numbers (through Optional, Union and Annotated)."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _numeric(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list):
        return any(_numeric(arg) for arg in typing.get_args(annotation))
    return False


class _Section(BaseModel):
    # Unknown keys are typos more often than not: refuse them. NaN and infinities are never a
    # meaningful learning rate, scale or limit: pydantic would otherwise accept them (nan > 0 is not checked).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `epochs: true` as 1: a YAML boolean where a number belongs is a mistake
        if info.field_name and _numeric(cls.model_fields[info.field_name].annotation):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(item, bool) for item in items):
                raise ValueError("must be a number, not a boolean")
        return value


class DataConfig(_Section):
    mnist_dir: Optional[str] = None  # IDX folder; None -> download from the canonical mirror
    ood_dir: Optional[str] = None  # Fashion-MNIST IDX folder; None -> download
    ambiguous_dir: Optional[str] = None  # original Ambiguous-MNIST files (DDU), if you have them
    download_dir: str = "data/downloads"
    val_size: int = Field(5000, ge=1)
    train_size: Optional[int] = Field(None, ge=1)  # cap on MNIST train images (None: all left)
    test_size: Optional[int] = Field(None, ge=1)
    ood_size: Optional[int] = Field(None, ge=1)


class VAEConfig(_Section):
    hidden: list[Annotated[int, Field(ge=1)]] = [512, 256]  # [] : a linear VAE
    latent_dim: int = Field(32, ge=2)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)


class EnsembleConfig(_Section):
    members: int = Field(5, ge=2)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)


class AmbiguousConfig(_Section):
    train_images: int = Field(6000, ge=1)
    val_images: int = Field(500, ge=1)
    test_images: int = Field(6000, ge=1)
    labels_per_image: int = Field(10, ge=1)
    min_classes: int = Field(2, ge=2, le=10)
    max_classes: int = Field(4, ge=2, le=10)
    max_mi: float = Field(0.05, gt=0)
    min_entropy: float = Field(0.3, ge=0)
    max_entropy: float = Field(3.0, gt=0)
    max_candidates: int = Field(2_000_000, ge=1)
    vae: VAEConfig = VAEConfig()
    ensemble: EnsembleConfig = EnsembleConfig()

    @model_validator(mode="after")
    def _ranges(self) -> "AmbiguousConfig":
        if self.min_classes > self.max_classes:
            raise ValueError("min_classes must be <= max_classes")
        if self.min_entropy >= self.max_entropy:
            raise ValueError("min_entropy must be < max_entropy")
        return self


class PriorScaling(str, Enum):
    FIXED = "fixed"  # every weight ~ N(0, prior_scale^2)
    FAN_IN = "fan_in"  # weights ~ N(0, prior_scale^2 / fan_in), biases ~ N(0, prior_scale^2)


class GradientEstimator(str, Enum):
    WEIGHT_SAMPLING = "weight_sampling"  # Pyro's TraceMeanField_ELBO: one weight draw per minibatch
    # Same ELBO, lower-variance gradients: dense pre-activations are sampled from their exact
    # Gaussian (Kingma et al. 2015); conv layers keep one weight draw per minibatch.
    LOCAL_REPARAMETERIZATION = "local_reparameterization"


class TrainConfig(_Section):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_final_factor: float = Field(0.1, gt=0, le=1)  # lr decays exponentially to lr * this at the last step
    prior_scale: float = Field(1.0, gt=0)
    prior_scaling: PriorScaling = PriorScaling.FIXED
    init_scale: float = Field(1e-3, gt=0)  # initial posterior std of every weight
    num_particles: int = Field(1, ge=1)
    estimator: GradientEstimator = GradientEstimator.WEIGHT_SAMPLING
    kl_warmup_epochs: int = Field(0, ge=0)  # KL weight ramps 0 -> 1 over these epochs, then the exact ELBO
    max_steps: Optional[int] = Field(None, ge=1)  # cap on optimisation steps (smoke runs)


class ConvertConfig(_Section):
    # Run each 2x2 max-pool before the ReLU it follows (exact for deterministic networks; see
    # pfp.convert.pool_before_relu). False keeps the trained model's order, e.g. for an ablation.
    pool_before_relu: bool = True
    # How PFP moment-matches each 2x2 max-pool (pfp.spec.PoolRule): clark, clark_logistic, argmax_mean.
    pool_rule: PoolRule = PoolRule.ARGMAX_MEAN
    # The model's PFP adds back the covariance of units that share inputs in its last k dense layers
    # (pfp.backends.covariance); 0: plain PFP. 2 brings both models' logit variance to the sampled
    # network's (median ratio ~1.0 vs ~0.5-0.75 plain) at a small cost (README, "Covariance-aware PFP").
    covariance_layers: int = Field(2, ge=0, le=16)


class CalibrationObjective(str, Enum):
    """What fits the PFP variance scale (``calibrate.objective``)."""

    NLL = "nll"  # validation NLL over the scale grid (rewards over-confidence in distribution)
    # label-free: PFP's logit variance matches the whole-weight Monte-Carlo variance of the unscaled
    # posterior on validation images (median log-ratio 0); keeps the epistemic signal
    MC_VARIANCE = "mc_variance"


class CalibrateConfig(_Section):
    objective: CalibrationObjective = CalibrationObjective.NLL
    variance_scales: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0])
    fit_temperature: bool = True  # by validation NLL, for either objective
    logit_samples: int = Field(100, ge=1)
    fidelity_samples: int = Field(1000, ge=2)  # whole-weight draws of the Monte-Carlo reference (mc_variance)
    fidelity_images: int = Field(300, ge=1)  # validation images it runs on

    @field_validator("variance_scales")
    @classmethod
    def _positive(cls, scales: list[float]) -> list[float]:
        if not scales or any(s <= 0 for s in scales):
            raise ValueError("must be a non-empty list of positive numbers")
        return scales


#: ``evaluate.pfp_backend``: the backend whose PFP predictor the pfp metrics come from
#: (``torch``: the PyTorch reference; ``tvm``: the compiled module, host CPU)
PFPBackend = Backend


class EvaluateConfig(_Section):
    svi_samples: int = Field(30, ge=2)
    logit_samples: int = Field(100, ge=2)  # Monte-Carlo draws over PFP's Gaussian logits (no network passes)
    moment_samples: int = Field(200, ge=2)  # SVI samples for the PFP-vs-SVI logit moment comparison
    moment_images: int = Field(1000, ge=1)
    ece_bins: int = Field(15, ge=1)
    batch_size: int = Field(1000, ge=1)
    pfp_backend: PFPBackend = PFPBackend.TVM
    fidelity_samples: int = Field(1000, ge=2)  # whole-weight draws of the fidelity report's Monte-Carlo reference
    fidelity_images: int = Field(300, ge=1)  # images per set of the fidelity report


def _positive_batch_sizes(sizes: list[int]) -> list[int]:
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError("must be a non-empty list of positive batch sizes")
    return sizes


BatchSizes = Annotated[list[int], AfterValidator(_positive_batch_sizes)]


def _positive_thread_counts(counts: list[int]) -> list[int]:
    if not counts or any(t < 1 for t in counts) or len(set(counts)) != len(counts):
        raise ValueError("must be a non-empty list of distinct thread counts >= 1")
    return counts


ThreadCounts = Annotated[list[int], AfterValidator(_positive_thread_counts)]


#: Where the compiled modules run: the board registry's names (one enum for the targets)
CompileTarget = TargetName


class Variant(str, Enum):
    """The compiled predictors of one model."""

    PFP = "pfp"  # probabilistic forward pass, joint mean/variance operators
    PFP_SEPARATE = "pfp_separate"  # the same with separate mean and variance operators (ablation)
    PFP_COV = "pfp_cov"  # covariance-aware PFP: the last convert.covariance_layers dense layers' covariance added back
    DET = "det"  # deterministic twin (mean weights): the cost floor
    SVI = "svi"  # SVI with pre-drawn weight samples, all members in one batched pass


class Peer(str, Enum):
    """Peers of the compiled predictors a user might pick instead (pfp.peers), timed beside them.

    The value is the latency.json key stem (``VALUE_ms``); the prefix says which compiled variant
    it competes with (``pfp_``: the PFP, ``det_``: the deterministic twin).
    """

    PFP_TORCH_COMPILE = "pfp_torch_compile"  # the PyTorch PFP reference under torch.compile (inductor)
    DET_TORCH_COMPILE = "det_torch_compile"  # the deterministic twin under torch.compile
    DET_ONNXRUNTIME = "det_onnxruntime"  # the twin exported to ONNX, run by ONNX Runtime (CPU)
    PFP_ONNXRUNTIME = "pfp_onnxruntime"  # the PFP reference exported to ONNX, run by ONNX Runtime

    @property
    def variant(self) -> "Variant":
        return Variant.PFP if self.value.startswith("pfp_") else Variant.DET


class BenchmarkConfig(_Section):
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 10, 100])
    svi_samples: int = Field(30, ge=1)
    repeat: int = Field(10, ge=1)  # Python-level baselines: median of this many timed calls
    warmup: int = Field(2, ge=0)  # untimed calls of each Python-level baseline before its timed ones
    tvm_number: int = Field(20, ge=1)  # time_evaluator: calls per measurement
    tvm_repeat: int = Field(5, ge=1)  # interleaved rounds: one measurement of every compiled variant each
    memory_variants: list[Variant] = Field(default_factory=lambda: [Variant.PFP, Variant.DET])  # profile.json's memory estimates
    peers: list[Peer] = Field(default_factory=lambda: list(Peer))  # peers timed beside the compiled predictors ([]: none)
    # serving (metrics/serving.json, pfp.serving_bench): per request from raw images, quiet and with a core kept busy
    serving_batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 100])  # images per request
    serving_threads: ThreadCounts = Field(default_factory=lambda: [1, 2])  # TVM thread-pool sizes compared
    serving_rounds: int = Field(20, ge=1)  # interleaved rounds: one turn of every contender each
    serving_turn_ms: float = Field(50.0, gt=0)  # a turn times requests for about this long (at least one)
    serving_max_calls: int = Field(100, ge=1)  # at most this many timed requests per turn
    serving_warmup: int = Field(3, ge=0)  # untimed requests of each contender before the rounds
    serving_torch_threads: Optional[int] = Field(None, ge=1)  # Pyro's torch threads (None: torch's default, as a user gets)
    serving_busy_processes: int = Field(1, ge=1)  # competing busy-loop processes of the loaded condition
    head_images: int = Field(300, ge=1)  # test images (MNIST, ambiguous, Fashion) of the uncertainty head's error
    head_reference_draws: int = Field(10_000, ge=100)  # Monte-Carlo draws of the head's reference

    @field_validator("peers")
    @classmethod
    def _distinct_peers(cls, peers: list[Peer]) -> list[Peer]:
        if len(set(peers)) != len(peers):
            raise ValueError("lists a peer twice")
        return peers


class RPCConfig(_Section):
    tracker: Optional[str] = None  # "host:port" of a TVM RPC tracker; None: measure locally
    key: Optional[str] = None  # the device key the boards registered under (e.g. rasp4b, rasp4b-emulated)
    emulated: bool = False  # the board is an emulator: its timings are recorded as emulated

    @field_validator("tracker")
    @classmethod
    def _host_port(cls, tracker: Optional[str]) -> Optional[str]:
        if tracker is not None:
            host, sep, port = tracker.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("must be 'host:port'")
        return tracker

    @model_validator(mode="after")
    def _both_or_neither(self) -> "RPCConfig":
        if (self.tracker is None) != (self.key is None):
            raise ValueError("set both tracker and key (RPC runner) or neither (local runner)")
        return self


class TuneParams(_Section):
    target: CompileTarget = CompileTarget.HOST
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 10, 100])
    variants: list[Variant] = Field(default_factory=lambda: list(Variant))
    trials_per_task: int = Field(16, ge=0)  # Meta Scheduler trials per task; 0: hand schedules only (measured)
    svi_samples: int = Field(30, ge=1)  # members of the compiled SVI ensemble
    number: int = Field(3, ge=1)  # runs per measurement of a candidate
    min_repeat_ms: int = Field(50, ge=0)  # each measurement lasts at least this long
    population_size: int = Field(64, ge=4)  # evolutionary search population
    finalists: int = Field(2, ge=0)  # best other records per task (search candidates, earlier hand schedules) re-measured beside the hand schedule
    selection_rounds: int = Field(3, ge=1)  # interleaved rounds of that side-by-side run-off
    switch_margin: float = Field(0.03, ge=0.0, le=1.0)  # another record replaces the hand schedule only when this much faster
    # Meta Scheduler search and measurement settings (pfp.backends.tvm.tuning.config.TuneConfig)
    max_trials_global: int = Field(100_000, ge=1)  # trial budget of one module, all tasks together
    max_trials_per_iter: int = Field(16, ge=1)  # candidates per search iteration (at most trials_per_task)
    repeat: int = Field(1, ge=1)  # measurements of a candidate, each of `number` runs
    genetic_num_iters: int = Field(2, ge=1)  # evolutionary search generations per iteration
    max_init_unmeasured: int = Field(16, ge=1)  # unmeasured initial candidates (at most population_size)
    search_seed: Optional[int] = Field(0, ge=0, le=2**63 - 1)  # seed of the search (None: random; TVM's int64)
    search_threads: Union[Annotated[int, Field(ge=1)], Literal["physical"]] = "physical"  # threads of the cost model and evolution
    builder_timeout_sec: float = Field(300.0, gt=0)  # a builder worker's start and one candidate's build
    builder_workers: Optional[int] = Field(None, ge=1)  # None: one per logical CPU
    lean_builder: bool = True  # build candidates without importing TVM's tensor intrinsics (no tensorize on CPU)
    runner_timeout_sec: float = Field(60.0, gt=0)  # local runner: one candidate's measurement
    session_timeout_sec: float = Field(60.0, gt=0)  # RPC runner: one board session
    # the whole-model guard (pfp.backends.tvm.tuning.guard): tuned vs all-hand module, the faster is exported
    guard_rounds: int = Field(9, ge=1)  # interleaved rounds, each timing both modules once; medians compared
    guard_margin: float = Field(0.03, ge=0.0, le=1.0)  # the tuned module is kept when at most this fraction slower
    guard_turn_ms: float = Field(50.0, gt=0)  # one module's turn in a round lasts about this long
    guard_busy_fraction: float = Field(0.25, gt=0)  # busy host: other processes used more than this share of the cores
    guard_busy_retries: int = Field(2, ge=0)  # re-measurements on a busy host; still busy: the hand build is kept
    guard_busy_wait_sec: float = Field(10.0, ge=0)  # pause before each re-measurement
    rpc: RPCConfig = RPCConfig()

    @field_validator("variants")
    @classmethod
    def _some_variant(cls, variants: list[Variant]) -> list[Variant]:
        if not variants:
            raise ValueError("must name at least one variant")
        return variants

    @model_validator(mode="after")
    def _board_needs_rpc(self) -> "TuneParams":
        if self.target is not CompileTarget.HOST and self.rpc.tracker is None:
            raise ValueError(f"target {self.target.value} runs on a board: set rpc.tracker and rpc.key "
                             "(candidates cannot be measured on this machine)")
        if self.rpc.emulated and self.rpc.tracker is None:
            raise ValueError("rpc.emulated needs rpc.tracker and rpc.key")
        return self


class OODScore(str, Enum):
    """The uncertainty score a bundle flags out-of-distribution images by."""

    MI = "mi"  #: mutual information (epistemic)
    SME = "sme"  #: softmax entropy of the prediction (total)


class BundleConfig(_Section):
    """The deployable bundles (:mod:`pfp.bundle`): targets, compiled batch sizes, head, OOD threshold."""

    targets: list[CompileTarget] = Field(default_factory=lambda: [CompileTarget.HOST])
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 100])
    head_draws: int = Field(128, ge=2)  # quasi-random logit draws of the uncertainty head
    ood_score: OODScore = OODScore.MI
    ood_target_tpr: float = Field(0.95, gt=0, lt=1)  # in-distribution validation images accepted (not flagged)

    @field_validator("targets")
    @classmethod
    def _host_first(cls, targets: list[CompileTarget]) -> list[CompileTarget]:
        if CompileTarget.HOST not in targets:
            raise ValueError("must include host: the OOD threshold is chosen by running the host bundle")
        return targets


class PromoteConfig(_Section):
    """The promotion gate (pfp.registry): a challenger replaces the champion only within these limits.

    Figures are the PFP method's on the test sets (metrics/evaluate.json) and its compiled
    latency at batch 1 (metrics/latency.json); the first version of a model is champion.
    """

    max_accuracy_drop: float = Field(0.005, ge=0)  # MNIST accuracy may fall at most this much
    max_nll_rise: float = Field(0.02, ge=0)  # test NLL may rise at most this much
    max_ece_rise: float = Field(0.01, ge=0)  # expected calibration error may rise at most this much
    max_auroc_drop: float = Field(0.01, ge=0)  # OOD AUROC (mutual information) may fall at most this much
    max_latency_ratio: float = Field(1.25, gt=0)  # PFP latency at batch 1 at most this times the champion's
    require_latency: bool = False  # refuse when a latency at batch 1 is missing (else that check is skipped)


#: largest seed: pyro.set_rng_seed seeds numpy's legacy generator (< 2**32), and stages use seed + 1 and seed + 2
MAX_SEED = 2**32 - 1 - 2


class PipelineParams(_Section):
    seed: int = Field(0, ge=0, le=MAX_SEED)
    models: list[Architecture] = Field([Architecture.MLP, Architecture.LENET], min_length=1)
    data: DataConfig = DataConfig()
    ambiguous: AmbiguousConfig = AmbiguousConfig()
    train: dict[Architecture, TrainConfig] = {}
    convert: ConvertConfig = ConvertConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneParams = TuneParams()
    bundle: BundleConfig = BundleConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    promote: PromoteConfig = PromoteConfig()

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, models: list[Architecture]) -> list[Architecture]:
        if len(set(models)) != len(models):
            raise ValueError("lists a model twice")
        return models

    @model_validator(mode="after")
    def _every_model_has_train_section(self) -> "PipelineParams":
        missing = [m.value for m in self.models if m not in self.train]
        if missing:
            raise ValueError(f"train: no section for model(s) {', '.join(missing)}")
        return self


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> PipelineParams:
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid parameters\n{_format_errors(error)}") from None


def load_params(path: str | Path = "params.yaml") -> PipelineParams:
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found" + (" (a folder)" if path.is_dir() else ""))
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the parameter file: {error.strerror or error}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_params(raw, str(path))
