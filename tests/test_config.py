"""Parameter loading: defaults, and a ConfigError naming the offending key for bad values."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import ValidationError

from pfp.config import ConfigError, PipelineParams, TrainConfig, load_params, parse_params
from pfp.spec import Architecture, PoolRule

VALID = """
seed: 3
models: [mlp]
data:
  mnist_dir: some/mnist
  val_size: 100
ambiguous:
  train_images: 10
  vae: {epochs: 2, hidden: [32]}
train:
  mlp: {epochs: 4, batch_size: 32, lr: 0.01}
calibrate:
  variance_scales: [0.5, 1.0]
evaluate:
  svi_samples: 5
"""


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_load_params_reads_values_and_fills_defaults(tmp_path):
    params = load_params(write(tmp_path, VALID))
    assert isinstance(params, PipelineParams)
    assert params.seed == 3
    assert params.models == [Architecture.MLP]
    assert params.data.mnist_dir == "some/mnist"
    assert params.data.val_size == 100
    assert params.data.ood_dir is None and params.data.download_dir == "data/downloads"
    assert params.ambiguous.train_images == 10
    assert params.ambiguous.val_images == 500  # default
    assert params.ambiguous.vae.epochs == 2 and params.ambiguous.vae.hidden == [32]
    assert params.ambiguous.vae.latent_dim == 32  # default inside a given sub-section
    assert params.ambiguous.ensemble.members == 5
    train = params.train[Architecture.MLP]
    assert (train.epochs, train.batch_size, train.lr) == (4, 32, 0.01)
    assert train.prior_scale == 1.0 and train.init_scale == 1e-3 and train.max_steps is None
    # string keys work too: Architecture is a str enum
    assert params.train["mlp"] is train
    assert params.calibrate.variance_scales == [0.5, 1.0]
    assert params.calibrate.fit_temperature is True
    assert params.evaluate.svi_samples == 5 and params.evaluate.ece_bins == 15


def test_defaults_without_any_file_content():
    params = parse_params({"train": {"mlp": {}, "lenet": {}}})
    assert params.seed == 0
    assert params.models == [Architecture.MLP, Architecture.LENET]
    assert params.data.val_size == 5000
    assert params.train[Architecture.LENET] == TrainConfig()
    assert params.calibrate.variance_scales == [0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0]
    assert params.evaluate.logit_samples == 100
    assert params.convert.pool_before_relu is True
    assert params.convert.pool_rule is PoolRule.ARGMAX_MEAN and params.convert.covariance_layers == 2


def test_pool_rule_is_read_from_params(tmp_path):
    params = load_params(write(tmp_path, "models: [lenet]\ntrain: {lenet: {}}\nconvert: {pool_rule: argmax_mean}\n"))
    assert params.convert.pool_rule is PoolRule.ARGMAX_MEAN


def test_the_repository_params_files_are_valid():
    # the recorded full run and the embedded default must both load
    for path in ("params.yaml", "configs/embedded.yaml"):
        params = load_params(path)
        assert {m.value for m in params.models} == {"mlp", "lenet"}
        assert params.convert.pool_before_relu is True


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("models: [mlp, resnet]\ntrain: {mlp: {}}\n", "models.1"),
        ("models: [mlp]\ntrain: {mlp: {epochs: -1}}\n", "train.mlp.epochs"),
        ("models: [mlp]\ntrain: {mlp: {epochz: 3}}\n", "train.mlp.epochz"),
        ("models: [mlp]\ntrain: {mlp: {}}\ndata: {val_sise: 3}\n", "data.val_sise"),
        ("models: [mlp]\ntrain: {mlp: {}}\nevaluate: {svi_samples: 1}\n", "evaluate.svi_samples"),
        ("models: [mlp]\ntrain: {mlp: {}}\ncalibrate: {variance_scales: [0.5, -1]}\n", "calibrate.variance_scales"),
        ("models: [mlp]\ntrain: {mlp: {}}\ncalibrate: {objective: mc_var}\n", "calibrate.objective"),
        ("models: [mlp]\ntrain: {mlp: {}}\ncalibrate: {fidelity_samples: 1}\n", "calibrate.fidelity_samples"),
        ("models: [mlp]\ntrain: {mlp: {}}\nevaluate: {fidelity_images: 0}\n", "evaluate.fidelity_images"),
        ("models: [mlp]\ntrain: {mlp: {}}\nambiguous: {vae: {latent_dim: 1}}\n", "ambiguous.vae.latent_dim"),
        ("models: [mlp]\ntrain: {mlp: {}}\ntypo_section: 1\n", "typo_section"),
        ("models: [mlp]\ntrain: {mlp: {}}\nconvert: {pool_before_relu: maybe}\n", "convert.pool_before_relu"),
        ("models: [mlp]\ntrain: {mlp: {}}\nconvert: {pool_first: true}\n", "convert.pool_first"),
        ("models: [mlp]\ntrain: {mlp: {}}\nconvert: {pool_rule: clarke}\n", "convert.pool_rule"),
    ],
)
def test_invalid_value_names_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message
    assert f"  {key}:" in message


def test_unknown_model_lists_the_valid_names(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, "models: [resnet]\ntrain: {mlp: {}}\n"))
    assert "models.0" in str(info.value) and "'resnet'" in str(info.value)
    assert "mlp" in str(info.value) and "lenet" in str(info.value)


def test_negative_epochs_message_gives_bound_and_value(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, "models: [mlp]\ntrain: {mlp: {epochs: -1}}\n"))
    assert "train.mlp.epochs: Input should be greater than or equal to 0 (got -1)" in str(info.value)


def test_missing_train_section_for_listed_model(tmp_path):
    with pytest.raises(ConfigError, match=r"train: no section for model\(s\) lenet"):
        load_params(write(tmp_path, "models: [mlp, lenet]\ntrain: {mlp: {}}\n"))


def test_zero_epochs_is_allowed():
    assert parse_params({"models": ["mlp"], "train": {"mlp": {"epochs": 0}}}).train["mlp"].epochs == 0


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: parameter file not found"):
        load_params(missing)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_params(write(tmp_path, text))


def test_invalid_yaml_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "models: [mlp\n"))


def test_min_classes_above_max_classes(tmp_path):
    text = "models: [mlp]\ntrain: {mlp: {}}\nambiguous: {min_classes: 5, max_classes: 3}\n"
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, text))
    assert "ambiguous:" in str(info.value)
    assert "min_classes must be <= max_classes" in str(info.value)


def test_min_entropy_not_below_max_entropy():
    with pytest.raises(ConfigError, match="min_entropy must be < max_entropy"):
        parse_params({"models": ["mlp"], "train": {"mlp": {}}, "ambiguous": {"min_entropy": 2.0, "max_entropy": 1.0}})


def test_params_are_frozen():
    params = parse_params({"models": ["mlp"], "train": {"mlp": {}}})
    with pytest.raises(ValidationError, match="frozen"):
        params.seed = 5


TRAIN = {"mlp": {}, "lenet": {}}


def test_tune_defaults_measure_locally_on_the_host():
    tune = parse_params({"train": TRAIN}).tune
    assert tune.target.value == "host" and tune.rpc.tracker is None and not tune.rpc.emulated
    assert [v.value for v in tune.variants] == ["pfp", "pfp_separate", "pfp_cov", "det", "svi"]


@pytest.mark.parametrize("tune, message", [
    ({"target": "rasp4b"}, "target rasp4b runs on a board: set rpc.tracker and rpc.key"),
    ({"rpc": {"tracker": "127.0.0.1:9190"}}, "set both tracker and key"),
    ({"rpc": {"tracker": "localhost", "key": "k"}}, "tune.rpc.tracker: Value error, must be 'host:port'"),
    ({"rpc": {"emulated": True}}, "rpc.emulated needs rpc.tracker and rpc.key"),
    ({"batch_sizes": [1, 0]}, "tune.batch_sizes"),
    ({"variants": ["pfp", "mc_dropout"]}, "tune.variants.1"),
    ({"trials_per_task": -1}, "tune.trials_per_task"),
    ({"switch_margin": 1.5}, "tune.switch_margin"),
])
def test_invalid_tune_section_names_the_problem(tune, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_params({"train": TRAIN, "tune": tune})


def test_emulated_board_is_a_valid_tuning_runner():
    tune = parse_params({"train": TRAIN, "tune": {"target": "rasp4b", "rpc": {
        "tracker": "127.0.0.1:9190", "key": "rasp4b-emulated", "emulated": True}}}).tune
    assert tune.rpc.key == "rasp4b-emulated" and tune.rpc.emulated


def test_tuning_and_benchmark_knobs_are_listed_in_every_params_file():
    """Every knob of the tune and benchmark sections is in the params files, so DVC sees its value."""
    import yaml

    from pfp.config import BenchmarkConfig, TuneParams

    for path in ("params.yaml", "configs/embedded.yaml"):
        raw = yaml.safe_load(open(path))
        assert not set(TuneParams.model_fields) - set(raw["tune"]), path
        assert not set(BenchmarkConfig.model_fields) - set(raw["benchmark"]), path


def test_search_threads_is_a_count_or_physical():
    from pfp.config import TuneParams

    assert TuneParams().search_threads == "physical" and TuneParams(search_threads=2).search_threads == 2
    with pytest.raises(ValidationError):
        TuneParams(search_threads="all")
    with pytest.raises(ValidationError):
        TuneParams(builder_timeout_sec=0)
