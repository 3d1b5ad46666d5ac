"""Optimisation-based visualisation in small composable pieces (Lucent style).

`param` (what is optimised), `transform` (robustness), `objectives` (what to minimise,
combined with + and *), `render` (the one loop). `visualize_unit` is the feature
visualisation the catalogue and `neurocat render featvis` share.
"""

from engine.optvis.featvis import visualize_unit

__all__ = ["visualize_unit"]
