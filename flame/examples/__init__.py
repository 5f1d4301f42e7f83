"""Small example models used by flame-compile's built-in default and the docs."""
