"""Arrives with issue 3 (kernels, runtime)."""
