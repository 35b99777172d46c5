"""pfp_runtime: run a compiled PFP bundle where the model is deployed (a board, a server).

Imports numpy and TVM's FFI runtime only: no torch, no Pyro, no TVM compiler (not even the
``tvm`` Python package), so a Raspberry Pi with ``apache-tvm`` (for ``libtvm_runtime.so``)
and numpy runs it. The pipeline's ``bundle`` stage writes the bundles (:mod:`pfp.bundle`).

Example::

    >>> from pfp_runtime import load_bundle
    >>> predictor = load_bundle("models/lenet/bundle/host")
    >>> prediction = predictor.predict(images)        # uint8 0-255 or float 0-1, (N, 28, 28) or (N, 1, 28, 28)
    >>> prediction.probs, prediction.predicted, prediction.mi, prediction.ood

Command line: ``pfp predict BUNDLE IMAGES...`` (:mod:`pfp_runtime.cli`).
"""

from pfp_runtime.bundle import BUNDLE_FORMAT, CHECKSUM_FILE, METADATA_FILE, Bundle, BundleError, read_bundle
from pfp_runtime.predictor import DEFAULT_THREADS, InputError, Prediction, Predictor, load_bundle

__all__ = ["BUNDLE_FORMAT", "CHECKSUM_FILE", "DEFAULT_THREADS", "METADATA_FILE", "Bundle", "BundleError", "InputError",
           "Prediction", "Predictor", "load_bundle", "read_bundle"]
