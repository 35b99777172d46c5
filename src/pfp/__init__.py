"""PFP: sampling-free Bayesian neural network inference (Probabilistic Forward Pass)."""

__version__ = "0.1.0"
