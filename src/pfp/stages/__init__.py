"""The pipeline's stages as importable functions: typed configs in, files written, results out.

Each module holds one DVC stage's logic (``prepare``, ``train``, ``convert``, ``calibrate``,
``report``, ...): it reads the stage's inputs from a workspace folder (``root``, the DVC
workspace; paths as in :mod:`pfp.stage`), writes its outputs there atomically and returns what
it made. Nothing here talks to MLflow or parses arguments: ``tasks/*.py`` do that around these
functions, so the stages run the same from a test, a notebook or the pipeline.
"""
