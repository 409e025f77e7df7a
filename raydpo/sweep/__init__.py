"""``raydpo sweep``: a grid of runs over one config as Ray Tune trials, sharing the data and reference stages."""

from raydpo.sweep.run import sweep

__all__ = ["sweep"]
