"""Barlow Twins is a built-in method now: ``methods/barlow_twins.py`` (``--method barlow_twins``),
with its loss in ``sslbench/core/losses.py``; see docs/recipes.md for its defaults.

The "write your own method" walkthrough (docs/write-your-own-method.md) builds a method that is not
built in: docs/examples/align_uniform.py. This file only re-exports the built-in plugin, so old
imports keep working.
"""

from sslbench.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss

__all__ = ["BarlowTwins", "BarlowTwinsConfig", "BarlowTwinsLoss"]
