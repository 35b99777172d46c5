"""The pipeline stages' logic as plain functions with typed configs (:mod:`pfp.config`).

``tasks/<stage>.py`` only parses its arguments, calls ``pfp.stages.<stage>.run`` and logs the
outcome to MLflow (:mod:`pfp.tracking`). Stage modules run predictors only through the backend
interface (:mod:`pfp.backends.base`): no TVM symbol appears here.
"""
