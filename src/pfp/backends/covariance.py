"""Which layers the covariance-aware PFP corrects: the plan every backend's epilogue follows.

Plain PFP treats the units of a layer as independent. Units that read the same inputs co-vary,
and the dropped covariance, weighted by the next layers' mean weights, makes PFP's logit
variance too small (about half of the network's on the trained posteriors). The
covariance-aware PFP adds that covariance back to first order for a trailing block of ``k``
dense layers (the last ``k``; ReLUs and flattens between them):

    corrected_var = pfp_var + exact - independent

* ``exact`` is the logit variance of the block linearised at PFP's means (ReLU slopes
  ``Phi(mu / sigma)``, the first-order covariance of rectified correlated Gaussians), fed by the
  boundary variance ``v`` (PFP's, of the block's input) and the weight noise ``n`` each dense
  layer injects (``sigma_w^2 (mu^2 + v) + sigma_b^2``), with every covariance kept:
  ``sum_j G_cj^2 v_j + sum_l sum_k G(l)_ck^2 n(l)_k``, where ``G`` is the Jacobian of logit ``c``
  (one backward pass of ``C`` rows through the block's mean weights);
* ``independent`` is the same linearised block propagated the way PFP does (variances through
  squared mean weights and squared slopes): a forward pass of one vector.

Their difference is exactly the cross-covariance the independence assumption drops inside the
block (to first order), so PFP's exact non-linear treatment of each unit is kept. The noise
of the last two dense layers reaches the logits along a single path and cancels, so it is never
computed. The cost is dominated by the block's widest layer: ``C x in x out`` multiply-adds
per example (MLP with k = 2: 10 x 100 x 100). Covariance created in convolutions (shared inputs,
shared weights) is outside the block and stays dropped; ``pfp.covariance_curve`` measures it.

Example::

    >>> plan = covariance_block(build_spec("lenet"), 3)
    >>> plan.dense_names
    ('fc1', 'fc2', 'fc3')
"""

from __future__ import annotations

from dataclasses import dataclass

from pfp.spec import ModelSpec, SpecError

__all__ = ["CovarianceBlock", "covariance_block", "max_covariance_layers", "variant_covariance_layers"]

#: layer kinds allowed inside the corrected block
_BLOCK_KINDS = ("dense", "relu", "flatten")


@dataclass(frozen=True)
class CovarianceBlock:
    """The trailing layers the correction spans: ``spec.layers[start:]``."""

    start: int  # index of the block's first dense layer
    dense_names: tuple[str, ...]

    @property
    def noisy_dense(self) -> tuple[str, ...]:
        """Dense layers whose injected weight noise reaches the logits along several paths."""
        return self.dense_names[:-2]


def max_covariance_layers(spec: ModelSpec) -> int:
    """How many trailing dense layers have only dense / ReLU / flatten layers after them."""
    count = 0
    for layer in reversed(spec.layers):
        if layer.kind not in _BLOCK_KINDS:
            break
        count += layer.kind == "dense"
    return count


def covariance_block(spec: ModelSpec, layers: int) -> CovarianceBlock | None:
    """The block of the last ``layers`` dense layers; None for 0 or 1 (nothing to correct: one
    dense layer maps independent inputs to the logits along single paths)."""
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        raise SpecError(f"covariance_layers must be an integer >= 0, got {layers!r}")
    available = max_covariance_layers(spec)
    if layers > available:
        raise SpecError(f"{spec.name}: covariance_layers {layers} exceeds the {available} trailing dense layers "
                        f"(the correction covers dense layers only, with ReLU/flatten between them)")
    if layers < 2:
        return None
    dense_indices = [index for index, layer in enumerate(spec.layers) if layer.kind == "dense"]
    start = dense_indices[-layers]
    if spec.layers[-1].kind != "dense":
        raise SpecError(f"{spec.name}: the covariance correction needs a dense output layer")
    return CovarianceBlock(start=start, dense_names=tuple(spec.layers[i].name for i in dense_indices[-layers:]))


def variant_covariance_layers(variant: str, model_layers: int) -> int:
    """The ``covariance_layers`` a compiled variant runs: the model's for ``pfp_cov``, 0 for the others."""
    if str(getattr(variant, "value", variant)) != "pfp_cov":
        return 0
    if model_layers < 2:
        raise SpecError(f"the pfp_cov variant needs a model converted with convert.covariance_layers >= 2 "
                        f"(this one has {model_layers}); drop pfp_cov from the variants or re-run convert")
    return model_layers
