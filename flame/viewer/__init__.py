"""The graph viewer: a Graph (and its Schedule) as one self-contained HTML page or as
Graphviz DOT. `flame-compile ... --html graph.html --dot graph.dot` writes both."""
from .dot import to_dot, write_dot
from .export import export
from .html import to_html, write_html

__all__ = ["export", "to_dot", "write_dot", "to_html", "write_html"]
