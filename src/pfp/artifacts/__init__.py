"""The pipeline's artifacts, each written and read through one validated writer / reader.

- posterior (:mod:`pfp.artifacts.posterior`): ``models/M/posterior.npz``, made from
  ``data/prepared/manifest.json``, written by ``train@M``;
- PFP parameters (:mod:`pfp.artifacts.pfp_params`): ``models/M/pfp.npz``, made from
  ``models/M/posterior.npz``, written by ``convert@M``;
- calibration (:mod:`pfp.artifacts.calibration`): ``models/M/calibration.json``, made from
  ``models/M/pfp.npz``, written by ``calibrate@M``.

Every artifact carries an :class:`~pfp.artifacts.header.ArtifactHeader`: its kind, the model it
belongs to (the spec name, ``mlp`` or ``lenet``), the format version and the sha256 of the file
it was made from. In an ``.npz`` archive the header is the JSON string entry ``artifact``; in a
JSON file it is the top-level key ``artifact``. Files are written atomically (:mod:`pfp.io`).

A reader is given the model the caller expects and refuses, with a message naming the file, the
model it belongs to, the one expected and the problem. Given the parent file, it also checks
the recorded parent hash: an artifact made from another parent is stale.

One module per kind, and a generic :mod:`pfp.artifacts.header` that imports neither torch nor
any kind (numpy and the standard library only), so that other artifacts (the compiled
libraries' metadata) reuse it without loading torch, and each stage imports only the kinds it
reads or writes (dvc.yaml lists each stage's imported modules: a change to the calibration
format does not re-run training). This ``__init__`` stays a docstring for the same reason.
"""
