"""The pipeline's stages as importable functions: typed configs in, files written, results out.

Each module holds one DVC stage's logic (``prepare``, ``train``, ``convert``, ``calibrate``,
``tune``, ``evaluate``, ``report``, ``benchmark``): it reads the stage's inputs from a workspace
folder (the DVC workspace; paths as in :mod:`pfp.stage`), writes its outputs there atomically and
returns what it made. Nothing here talks to MLflow or parses arguments: ``tasks/*.py`` do that
around these functions, so the stages run the same from a test, a notebook or the pipeline.
Stage modules run predictors only through the backend interface (:mod:`pfp.backends.base`): no
TVM symbol appears here.
"""
