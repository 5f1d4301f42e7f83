"""The graph IR: dtypes, nodes, the primitive table, tracing, autodiff, passes, interpreter."""
