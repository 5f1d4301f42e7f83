"""Command-line entry points: flame-compile and flame-train."""
