"""One self-contained HTML page of a viewer model: Cytoscape.js and its dagre layout (vendored
from the npm registry, MIT, licenses kept in the files), the viewer's own script and the
model as JSON, all inline, so the page opens offline and makes no network request."""
from __future__ import annotations

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = ("vendor/cytoscape.min.js", "vendor/cytoscape-dagre.min.js")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<title>flame · {title}</title>
<style>
* {{ box-sizing: border-box; }}
body {{ margin: 0; font: 13px/1.35 system-ui, sans-serif; color: #222; height: 100vh;
  display: grid; grid-template-rows: auto 1fr 150px; grid-template-columns: 280px 1fr 400px;
  grid-template-areas: "head head head" "left graph details" "time time details"; }}
header {{ grid-area: head; padding: 6px 10px; background: #2b2d42; color: #eee; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }}
header b {{ font-size: 15px; }}
.legend span {{ display: inline-block; padding: 1px 6px; margin-right: 4px; border-radius: 4px; color: #222; font-size: 11px; }}
.legend .bwd {{ border: 1px dashed #222; background: #fff8; }}
#left {{ grid-area: left; overflow: auto; border-right: 1px solid #ccc; padding: 8px; }}
#graph {{ grid-area: graph; position: relative; min-height: 0; }}
#cy {{ position: absolute; inset: 0; }}
#status {{ position: absolute; left: 8px; bottom: 6px; font-size: 11px; color: #666; background: #fffc; }}
#details {{ grid-area: details; overflow: auto; border-left: 1px solid #ccc; padding: 8px; }}
#timeline {{ grid-area: time; border-top: 1px solid #ccc; padding: 4px 8px; min-width: 0; }}
#timeline svg {{ width: 100%; height: 112px; display: block; cursor: crosshair; }}
#search {{ width: 100%; padding: 4px; font: inherit; }}
#results {{ max-height: 35vh; overflow: auto; margin: 4px 0 10px; }}
.row {{ cursor: pointer; padding: 1px 3px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; font-family: monospace; font-size: 12px; }}
.row:hover {{ background: #e8eefc; }}
.row .dim, .dim {{ color: #888; }}
.tree-toggle {{ display: inline-block; width: 12px; }}
h3 {{ margin: 8px 0 4px; font-size: 13px; }}
table.kv {{ border-collapse: collapse; width: 100%; }}
table.kv td {{ padding: 1px 4px; vertical-align: top; font-family: monospace; font-size: 12px; word-break: break-all; }}
table.kv td:first-child {{ color: #666; white-space: nowrap; font-family: system-ui, sans-serif; }}
a.ref {{ color: #2450b0; cursor: pointer; text-decoration: underline; }}
pre.src {{ background: #f6f6f6; border: 1px solid #ddd; padding: 6px; font-size: 11px; overflow: auto; max-height: 45vh; }}
button {{ font: inherit; font-size: 12px; }}
</style></head>
<body>
<header><b>flame</b><span id="title"></span><span id="summary"></span><span class="legend" id="legend"></span></header>
<aside id="left">
  <input id="search" type="search" placeholder="search op, name or scope" autocomplete="off">
  <div id="results"></div>
  <label><input type="checkbox" id="kboxes" checked> kernel boxes</label>
  <button id="collapse-all">collapse all</button>
  <h3>scopes</h3><div id="outline"></div>
</aside>
<div id="graph"><div id="cy"></div><div id="status"></div></div>
<aside id="details"><p class="dim">Click a node for its details; click a module box to open it.</p></aside>
<footer id="timeline"><div id="mem-readout" class="dim"></div><svg id="mem"></svg></footer>
<script id="flame-data" type="application/json">{data}</script>
<script id="flame-options" type="application/json">{options}</script>
{scripts}
</body></html>
"""


def _inline_script(text: str) -> str:
    # a source-map comment would make devtools fetch a file that is not here
    text = re.sub(r"^//# sourceMappingURL=.*$", "", text, flags=re.M)
    if re.search(r"</script", text, re.I):
        raise ValueError("a vendored script contains '</script': it cannot be inlined as is")
    return f"<script>\n{text}\n</script>"


def _json_for_script(obj) -> str:
    # "</" would end the <script> element early; "<\\/" is the same JSON string
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def to_html(model: dict, expand_below: int = 150) -> str:
    """expand_below: a graph with at most this many nodes opens fully expanded; a larger one
    opens collapsed to its top-level module scopes."""
    scripts = []
    for rel in VENDOR + ("viewer.js",):
        with open(os.path.join(HERE, rel), encoding="utf-8") as f:
            scripts.append(_inline_script(f.read()))
    title = model["name"] + (f" ({model['target']})" if model.get("target") else "")
    return PAGE.format(title=title.replace("&", "&amp;").replace("<", "&lt;"),
                       data=_json_for_script(model),
                       options=_json_for_script({"expand_below": expand_below}),
                       scripts="\n".join(scripts))


def write_html(model: dict, path: str, expand_below: int = 150) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_html(model, expand_below))
