"""The posterior artifact: header recorded; another model's, another kind's, a headerless or an
inconsistent file refused, with the file and both models named."""

from __future__ import annotations

import numpy as np

from pfp.artifacts.header import HEADER_KEY, ArtifactHeader, ArtifactKind, sha256_of
from pfp.artifacts.pfp_params import save_pfp_params
from pfp.artifacts.posterior import load_posterior, save_posterior
from pfp.bnn import PosteriorError
from pfp.convert import convert_posterior

from ..common import npz_header, random_posterior, refusal


def test_posterior_records_kind_model_format_and_parent(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"data_hash": "x"}')
    posterior = random_posterior("lenet")
    header = save_posterior(posterior, tmp_path / "posterior.npz", parent=manifest)
    assert npz_header(tmp_path / "posterior.npz") == header.to_dict() == {
        "kind": "posterior", "model": "lenet", "format": ArtifactKind.POSTERIOR.format,
        "parent_sha256": sha256_of(manifest)}
    loaded = load_posterior(tmp_path / "posterior.npz", "lenet", parent=manifest)
    assert loaded.spec == posterior.spec
    assert all(np.array_equal(loaded.scale[site], posterior.scale[site]) for site in posterior.scale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "posterior.npz"]  # atomic: no temp file


def test_lenet_posterior_in_the_mlp_slot_is_refused(tmp_path):
    """Reported: LeNet's posterior copied into the MLP's slot was converted without a word."""
    path = tmp_path / "models" / "mlp" / "posterior.npz"
    save_posterior(random_posterior("lenet"), path)
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"),
            str(path), "posterior file of model 'lenet', expected 'mlp'", "belongs to another model", "train@mlp")


def test_posterior_without_header_is_refused(tmp_path):
    path = tmp_path / "posterior.npz"
    posterior = random_posterior("mlp")
    arrays = {"spec": np.array(posterior.spec.to_json())}
    for site in posterior.loc:
        arrays[f"{site}.loc"], arrays[f"{site}.scale"] = posterior.loc[site].numpy(), posterior.scale[site].numpy()
    np.savez(path, **arrays)  # the format before artifact headers
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"), str(path), "expected model 'mlp'", "no artifact header",
            "re-run the train@mlp stage")


def test_other_kind_newer_format_and_inconsistent_spec_are_refused(tmp_path):
    posterior = random_posterior("mlp")
    pfp_path = tmp_path / "pfp.npz"
    save_pfp_params(convert_posterior(posterior), pfp_path, parent=None)
    refusal(PosteriorError, lambda: load_posterior(pfp_path, "mlp"), str(pfp_path), "holds a 'pfp_params' artifact, not a 'posterior'")

    path = tmp_path / "posterior.npz"
    save_posterior(posterior, path)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays[HEADER_KEY] = np.array(ArtifactHeader("posterior", "mlp", None, format=99).to_json())
    np.savez(path, **arrays)
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"), "format 99 is newer than this code reads")

    arrays[HEADER_KEY] = np.array(ArtifactHeader("posterior", "lenet", None).to_json())  # header says lenet, spec mlp
    np.savez(path, **arrays)
    refusal(PosteriorError, lambda: load_posterior(path, None), str(path), "its spec describes model 'mlp'")


def test_posterior_values_are_still_checked_with_the_models_named(tmp_path):
    path = tmp_path / "models" / "mlp" / "posterior.npz"
    save_posterior(random_posterior("mlp"), path)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["fc2_bias.scale"][1] = -1.0
    np.savez(path, **arrays)
    refusal(PosteriorError, lambda: load_posterior(path, "mlp"), str(path), "of model 'mlp', expected 'mlp'",
            "fc2_bias.scale has 1 non-positive value(s)")
