"""Stable Diffusion 1.5 models in flame.nn (issue 4)."""
