"""Where PFP's dropped covariance arises, and what correcting it costs: the fidelity-versus-cost curve.

For each option (plain PFP, the covariance-aware PFP over the last k dense layers, and the
whole network linearised at the mean weights) it reports the logit variance against whole-weight
Monte-Carlo of the same posterior and the extra multiply-adds per example. The last point adds to
PFP's variance ``exact - independent`` of the *whole* network linearised at the mean weights
(``sum_w (dz/dw)^2 sigma_w^2`` by per-example autograd, minus the same linearisation propagated
with independent units), i.e. the dropped covariance of every layer, convolutions included; it
costs about ``C`` backward passes. The share of the dropped covariance the dense block recovers is
``correction(k) / correction(all)``, summed over images and logits.

Run: ``python -m pfp.covariance_curve --workspace W --model lenet [--images 100 --samples 1000]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

from pfp import metrics
from pfp.backends.covariance import covariance_block, max_covariance_layers
from pfp.backends.torch_ref import DETERMINISTIC_LAYERS, deterministic_forward, ensemble_forward, pfp_forward
from pfp.backends.weights import sample_stacked_weights
from pfp.bnn import site_names
from pfp.io import atomic_write_json
from pfp.predictive import gaussian_logit_noise, gaussian_logit_softmax_samples
from pfp.spec import LayerTable, ModelSpec

__all__ = ["MI_DRAWS", "correction_macs", "curve", "linearised_correction", "main"]

#: draws of PFP's Gaussian logits per image for its MI (as the evaluate stage's logit_samples)
MI_DRAWS = 1000


def _linear_var(layer, h: torch.Tensor, r: torch.Tensor | None, weights) -> torch.Tensor:
    (w, _), (w_var, b_var) = weights["mean"][layer.name], weights["var"][layer.name]
    if layer.kind == "dense":
        h = h.flatten(1)
        out = F.linear(h.square(), w_var, b_var)
        return out if r is None else out + F.linear(r.flatten(1), w.square())
    kw = {"stride": layer.stride, "padding": layer.padding}
    out = F.conv2d(h.square(), w_var, b_var, **kw)
    return out if r is None else out + F.conv2d(r, w.square(), None, **kw)


def _lin_parametric(layer, index, state, weights):
    h, r = state
    # the activation at the mean weights: the deterministic twin's own handler
    return DETERMINISTIC_LAYERS[layer.kind](layer, index, h, weights["mean"]), _linear_var(layer, h, r, weights)


def _lin_pool(_layer, _index, state, _weights):
    h, r = state
    pooled, indices = F.max_pool2d(h, 2, return_indices=True)
    if r is None:
        return pooled, None
    return pooled, r.flatten(2).gather(2, indices.flatten(2)).view_as(pooled)


#: the network linearised at the mean weights, its variance propagated with independent units:
#: state (activation at the means, variance or None)
LINEARISED_INDEPENDENT = LayerTable("torch.linearised_independent", {
    "dense": _lin_parametric,
    "conv2d": _lin_parametric,
    "relu": lambda _l, _i, state, _w: (torch.relu(state[0]), None if state[1] is None else state[1] * (state[0] > 0)),
    "maxpool2d": _lin_pool,
    "flatten": lambda _l, _i, state, _w: (state[0].flatten(1), None if state[1] is None else state[1].flatten(1)),
})


def linearised_correction(spec: ModelSpec, posterior, x: torch.Tensor, *, chunk: int = 25) -> torch.Tensor:
    """``exact - independent`` of the whole network linearised at the mean weights, (B, C)."""
    means = {name: (w.detach(), b.detach()) for name, (w, b) in posterior.mean_weights().items()}
    variances = {layer.name: tuple(posterior.scale[site].square() for site in site_names(layer.name))
                 for layer in spec.parametric_layers()}

    def logits(weights, image):
        return deterministic_forward(spec, weights, image.unsqueeze(0))[0]

    exact = []
    for start in range(0, x.shape[0], chunk):
        jac = vmap(jacrev(logits), in_dims=(None, 0))(means, x[start:start + chunk])
        total = 0.0
        for name, (w_jac, b_jac) in jac.items():
            w_var, b_var = variances[name]
            total = total + (w_jac.square() * w_var).flatten(2).sum(-1) + (b_jac.square() * b_var).flatten(2).sum(-1)
        exact.append(total)
    _, independent = LINEARISED_INDEPENDENT.walk(spec, (x, None), {"mean": means, "var": variances})
    return torch.cat(exact) - independent


def correction_macs(spec: ModelSpec, layers: int) -> int:
    """Multiply-adds per example the covariance-aware epilogue adds (backward rows, forward vector, noise)."""
    block = covariance_block(spec, layers)
    if block is None:
        return 0
    dense = {layer.name: layer for layer in spec.layers if layer.kind == "dense"}
    size = {name: dense[name].in_features * dense[name].out_features for name in block.dense_names}
    classes = spec.num_outputs
    # a block starting at the network's input carries no boundary variance: its first layer is
    # neither propagated forward nor back-propagated through, only its noise is computed
    deterministic_input = not any(layer.parametric for layer in spec.layers[:block.start])
    carried = block.dense_names[1:] if deterministic_input else block.dense_names
    macs = sum(size[name] for name in carried)  # the forward vector
    macs += sum(classes * size[name] for name in carried[:-1])  # Jacobian rows backwards (the last layer seeds them)
    return macs + sum(size[name] for name in block.noisy_dense)


def pfp_macs(spec: ModelSpec) -> int:
    """Multiply-adds per example of plain PFP's linear layers (mean and variance sums, E[w^2] terms)."""
    total, random = 0, False
    for layer, out in zip(spec.layers, spec.output_shapes()):
        if layer.parametric:
            per_output = layer.in_features if layer.kind == "dense" else layer.in_channels * layer.kernel_size ** 2
            total += math.prod(out) * per_output * (3 if random else 2)
            random = True
    return total


def curve(spec: ModelSpec, posterior, params, x: torch.Tensor, *, samples: int, seed: int = 0,
          draws_per_pass: int = 100) -> dict:
    """Median / 10th / 90th percentile of PFP / Monte-Carlo logit variance and the extra cost, per option."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    with torch.no_grad():
        for start in range(0, samples, draws_per_pass):
            stacked = sample_stacked_weights(posterior, min(draws_per_pass, samples - start), generator)
            draws.append(ensemble_forward(spec, stacked, x))
    draws = torch.cat(draws)
    mc_var = draws.var(0)
    mc_mi = metrics.mutual_information(torch.softmax(draws, -1).numpy())
    noise = gaussian_logit_noise(MI_DRAWS, (x.shape[0], spec.num_outputs), seed)
    with torch.no_grad():
        logit_mean, plain = pfp_forward(spec, params, x)
    linearised = linearised_correction(spec, posterior, x).detach()
    options = {"plain": (plain, 0)}
    for k in range(2, max_covariance_layers(spec) + 1):
        with torch.no_grad():
            options[f"dense_last_{k}"] = (pfp_forward(spec, params, x, covariance_layers=k)[1], correction_macs(spec, k))
    det_macs = pfp_macs(spec) // 2
    options["linearised_all_layers"] = ((plain + linearised).clamp_min(0), 2 * spec.num_outputs * det_macs)
    rows, mi = {}, {"monte_carlo": mc_mi}
    for name, (var, macs) in options.items():
        ratio = (var / mc_var).flatten()
        mi[name] = metrics.mutual_information(gaussian_logit_softmax_samples(logit_mean, var, noise=noise))
        rows[name] = {"median_ratio": float(ratio.median()), "p10_ratio": float(ratio.quantile(0.1)),
                      "p90_ratio": float(ratio.quantile(0.9)), "extra_macs": int(macs),
                      "extra_macs_over_pfp": macs / pfp_macs(spec),
                      "share_of_dropped_covariance": float((var - plain).sum() / linearised.sum()),
                      "mean_mi": float(mi[name].mean()), "mi_ratio": float(mi[name].mean() / mc_mi.mean())}
    return {"images": int(x.shape[0]), "samples": samples, "mean_mi_monte_carlo": float(mc_mi.mean()),
            "single_variance_rel_se": math.sqrt(2.0 / (samples - 1)), "options": rows, "mi": mi}


def main(argv: list[str] | None = None) -> None:
    from pfp.artifacts.trained import load_trained
    from pfp.data.dirty_mnist import load_prepared, normalise

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("."))
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    trained = load_trained(args.model, root=args.workspace)
    arrays = load_prepared(args.workspace / "data" / "prepared")
    spec, params = trained.pfp_model.spec, trained.pfp_model.params
    report = {}
    for split in ("mnist_test", "ambiguous_test", "ood_test"):
        x = normalise(arrays[f"{split}_x"][:args.images])
        report[split] = curve(spec, trained.posterior, params, x, samples=args.samples)
        for name, row in report[split]["options"].items():
            print(f"{args.model} {split:15s} {name:22s} median {row['median_ratio']:.3f} "
                  f"p10-p90 {row['p10_ratio']:.3f}-{row['p90_ratio']:.3f}  +MACs {row['extra_macs_over_pfp']:.2f}x PFP  "
                  f"share {row['share_of_dropped_covariance']:.2f}  MI ratio {row['mi_ratio']:.3f}", flush=True)
    mi_in, mi_out = report["mnist_test"].pop("mi"), report["ood_test"].pop("mi")
    report["ambiguous_test"].pop("mi")
    report["ood_auroc_mi"] = {name: metrics.auroc(mi_in[name], mi_out[name]) for name in mi_in}
    print(f"{args.model} OOD AUROC (MI, MNIST vs Fashion): "
          + ", ".join(f"{name} {value:.4f}" for name, value in report["ood_auroc_mi"].items()), flush=True)
    if args.output:
        atomic_write_json(args.output, report)


if __name__ == "__main__":
    main()
