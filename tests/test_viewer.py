"""The graph viewer: the exported model against the schedule it shows, the DOT file's
structure, `flame-compile --html/--dot`, and the page itself in headless Chromium (Debian's
package, driven over the DevTools protocol): no console errors, no network requests, a real
click on a node fills the details panel, opening a module box shows its children, the search
finds an op; the SD 1.5 UNet training step's page opens within a time bound. Screenshots go
to $FLAME_TEST_ARTIFACTS (default tests/artifacts/)."""
import json
import os
import re
import time

import pytest

import flame
import flame.nn as nn
from flame.cli import compile as cli
from flame.codegen.schedule import make_schedule
from flame.examples.block import Block
from flame.ir.printer import fmt_bytes, is_literal
from flame.runtime.arena import ALIGN
from flame.viewer import export, to_dot, to_html, write_html

from chromium import Chromium, find_chromium

ARTIFACTS = os.environ.get("FLAME_TEST_ARTIFACTS") or os.path.join(os.path.dirname(__file__), "artifacts")


class Net(nn.Module):
    """Two attention blocks in a ModuleList and a linear head: scopes three levels deep."""

    def __init__(self, c=8):
        super().__init__()
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.head = nn.Linear(c, c)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.transpose(1, 3)).sum()


@pytest.fixture(scope="module")
def small():
    """(schedule, model) of Net's training step, fused for CUDA (no GPU needed to plan)."""
    flame.manual_seed(0)
    net = Net()
    vg = flame.value_and_grad(lambda x: net(x), params=net)
    graph = flame.passes.optimize(flame.trace(vg, flame.spec((2, 8, 4, 4)), name="net_step"))
    sched = make_schedule(graph, "cuda")
    return sched, export(graph, sched)


def dump_names(sched) -> dict:
    """name -> type as flame.dump prints each equation (parsed from its text)."""
    out = {}
    for line in flame.dump(sched.graph, runner=sched).splitlines():
        m = re.match(r"^  (\S+):(\w+\[[\d,]*\]) = ", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# ---------------------------------------------------------------- the exported model

def test_every_node_once_with_the_dumps_names(small):
    sched, model = small
    g = sched.graph
    ids = [n["id"] for n in model["nodes"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {n.id for n in g.all_nodes() if not is_literal(n)}
    by_id = {n["id"]: n for n in model["nodes"]}
    dumped = dump_names(sched)
    computed = [n for n in model["nodes"] if n["op"] != "input"]
    assert {n["name"]: n["type"] for n in computed} == dumped
    for n in g.all_nodes():
        if is_literal(n):
            continue
        d = by_id[n.id]
        assert (d["op"], tuple(d["shape"]), d["dtype"], d["loc"], d["rule"], d["bwd"]) == \
            (n.op, n.shape, n.dtype.name, n.loc, n.rule, n.rule is not None)
    assert {tuple(e) for e in model["edges"]} == \
        {(i.id, n.id) for n in g.nodes for i in n.inputs if not is_literal(i)}
    assert model["summary"]["bwd"] == sum(n.rule is not None for n in g.nodes if not is_literal(n)) > 0


def test_kernel_membership_and_source_equal_the_schedule(small):
    sched, model = small
    by_id = {n["id"]: n for n in model["nodes"]}
    assert [k["name"] for k in model["kernels"]] == [k.name for k in sched.kernels]
    in_kernel = set()
    for i, (k, d) in enumerate(zip(sched.kernels, model["kernels"])):
        members = {n.id for n in k.nodes if not is_literal(n)}
        assert set(d["nodes"]) == members and d["root"] == k.root.id
        # a value recomputed in several kernels (rule recompute) belongs to the first
        assert all(by_id[m]["kernel"] == i or i in by_id[m]["recomputed_in"] for m in members)
        assert all(by_id[m]["kernel"] < i for m in members if i in by_id[m]["recomputed_in"])
        in_kernel |= members
        if k.root.id in sched.descs and sched.runs(k):
            assert d["source"] == sched.source(k, with_prelude=False) and f"def {k.name}(" in d["source"]
        else:
            assert d["source"] is None
    # what no kernel computes is read from memory: graph inputs and array constants
    assert {n["op"] for n in model["nodes"] if n["id"] not in in_kernel} <= {"input", "const"}
    assert model["summary"]["launches"] == sum(1 for k in sched.kernels if sched.runs(k))


def test_scope_tree_holds_every_node_where_its_module_is(small):
    sched, model = small
    scopes = model["scopes"]
    assert scopes[""]["count"] == len(model["nodes"])
    assert {"blocks", "blocks.0", "blocks.1", "blocks.0.to_q", "head"} <= set(scopes)
    placed = [nid for s in scopes.values() for nid in s["nodes"]]
    assert sorted(placed) == sorted(n["id"] for n in model["nodes"])
    for path, s in scopes.items():
        assert s["fwd"] + s["bwd"] == s["count"] == len(s["nodes"]) + sum(scopes[c]["count"] for c in s["children"])
        assert all(scopes[c]["parent"] == path for c in s["children"])
    by_id = {n.id: n for n in sched.graph.all_nodes()}
    for n in model["nodes"]:
        node = by_id[n["id"]]
        if node.op == "input" and node.attrs["kind"] == "param":   # under the module that owns it
            assert n["scope"] == node.attrs["name"].rpartition(".")[0]
        else:
            assert n["scope"] == node.scope
    grads = [n for n in model["nodes"] if n["bwd"] and n["scope"].startswith("blocks.1.")]
    assert grads, "backward nodes sit under their forward module's scope"


def test_memory_timeline_peaks_at_the_plan(small):
    sched, model = small
    mem, plan = model["memory"], sched.plan
    assert len(mem["live"]) == len(mem["top"]) == len(sched.kernels) + 2 == len(mem["steps"])
    assert max(mem["top"]) == mem["peak"] == plan.peak
    assert all(0 < live <= top <= plan.peak for live, top in zip(mem["live"], mem["top"]))
    align = lambda b: (max(b, 1) + ALIGN - 1) // ALIGN * ALIGN   # noqa: E731
    before = [n for n in sched.graph.inputs] + [n for n in sched.graph.nodes if n.op == "const" and not is_literal(n)]
    assert mem["live"][0] == sum(align(n.nbytes) for n in before)   # step 0: inputs and constants only
    assert max(mem["live"]) < plan.naive


# ---------------------------------------------------------------- DOT

def dot_structure(text: str):
    """Check the braces balance outside strings; -> ({node id: enclosing cluster label},
    [edges], [cluster labels])."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            in_str, esc = (not (ch == '"' and not esc)), (ch == "\\" and not esc)
        elif ch == '"':
            in_str = True
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
            assert depth >= 0
    assert depth == 0 and not in_str
    stack, nodes, edges, clusters = [], {}, [], []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("subgraph cluster_"):
            stack.append(None)
        elif s.startswith("label=") and stack and stack[-1] is None:
            stack[-1] = json.loads(s[len("label="):-1]).split("  (")[0]
            clusters.append(stack[-1])
        elif s == "}" and stack:
            stack.pop()
        elif m := re.match(r"^n(\d+) -> n(\d+)", s):
            edges.append((int(m.group(1)), int(m.group(2))))
        elif m := re.match(r"^n(\d+) \[(.*)\];$", s):
            nodes[int(m.group(1))] = (stack[-1] if stack else "", m.group(2))
    return nodes, edges, clusters


def test_dot_declares_every_node_in_its_scopes_cluster(small):
    _, model = small
    nodes, edges, clusters = dot_structure(to_dot(model))
    assert to_dot(model).startswith('digraph "net_step" {')
    assert sorted(clusters) == sorted(p for p in model["scopes"] if p)
    assert set(nodes) == {n["id"] for n in model["nodes"]}
    assert set(edges) == {tuple(e) for e in model["edges"]}
    for n in model["nodes"]:
        scope, attrs = nodes[n["id"]]
        assert scope == n["scope"]
        assert ("dashed" in attrs) == n["bwd"]


def test_dot_quotes_names_with_quotes():
    g = flame.trace(lambda x: (x * 2.0).exp(), flame.spec((3,)), name='odd "name"')
    text = to_dot(export(g))
    assert text.startswith('digraph "odd \\"name\\"" {')
    dot_structure(text)


# ---------------------------------------------------------------- flame-compile --html / --dot

def test_cli_writes_html_and_dot_and_keeps_the_dump(tmp_path, capsys):
    html, dot = tmp_path / "g.html", tmp_path / "g.dot"
    assert cli.main([]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["--html", str(html), "--dot", str(dot)]) == 0
    out, err = capsys.readouterr()
    assert out == plain   # the files are extra: stdout is still the dump
    assert f"wrote {html}" in err and f"wrote {dot}" in err
    page = html.read_text()
    # self-contained: no external script, style, link or image
    assert not re.search(r"<(script|img|iframe)[^>]*\bsrc=|<link\b", page, re.I)
    assert "Content-Security-Policy" in page
    data = json.loads(re.search(r'<script id="flame-data" type="application/json">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert data["name"] == "loss_grad" and data["target"] == "cuda" and data["memory"]["peak"] > 0
    nodes, _, _ = dot_structure(dot.read_text())
    assert set(nodes) == {n["id"] for n in data["nodes"]}


def test_cli_html_bad_path_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["--html", str(tmp_path / "no" / "such" / "dir.html")]) == 2
    assert "--html" in capsys.readouterr().err


def test_html_escapes_script_end_in_names():
    g = flame.trace(lambda x: x + 1.0, flame.spec((2,)), name="f")
    g.inputs[0].attrs["name"] = "</script><b>x"
    page = to_html(export(g))
    assert "</script><b>x" not in page and "<\\/script><b>x" in page


# ---------------------------------------------------------------- in the browser

@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with Chromium(exe) as b:
        yield b


def open_page(browser, path, timeout=30.0):
    page = browser.open("file://" + os.path.abspath(path))
    seconds = page.wait_for("window.flameViewer && flameViewer.ready === true", timeout=timeout)
    return page, seconds


def shot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(os.path.join(ARTIFACTS, name))


def click(page, element_id):
    pos = page.evaluate(f"flameViewer.pagePosition({json.dumps(element_id)})")
    page.click(pos["x"], pos["y"])


def test_page_in_chromium(browser, small, tmp_path):
    sched, model = small
    path = tmp_path / "net.html"
    write_html(model, str(path))
    page, _ = open_page(browser, path)
    url = "file://" + os.path.abspath(path)
    assert page.errors == []
    # 317 nodes: it opens collapsed to the top-level modules
    visible = set(page.evaluate("flameViewer.visible()"))
    assert {"s:blocks", "s:head"} <= visible and not any(v.startswith("s:blocks.") for v in visible)

    # a real click on a module box opens it: its children appear in its place
    click(page, "s:blocks")
    page.wait_for("flameViewer.visible().includes('s:blocks.0')", timeout=10)
    visible = set(page.evaluate("flameViewer.visible()"))
    assert {"s:blocks.0", "s:blocks.1", "x:blocks"} <= visible and "s:blocks" not in visible
    click(page, "s:blocks.1")
    page.wait_for("flameViewer.visible().includes('s:blocks.1.to_q')", timeout=10)
    direct = [f"n{i}" for i in model["scopes"]["blocks.1"]["nodes"]]
    assert set(direct) <= set(page.evaluate("flameViewer.visible()"))

    # a real click on a node of a generated kernel: its details, its kernel and that kernel's source
    by_id = {n["id"]: n for n in model["nodes"]}
    k = next(k for k in model["kernels"] if k["source"] and any(by_id[i]["scope"] == "blocks.1" and not by_id[i]["bwd"]
                                                             for i in k["nodes"]))
    node = next(by_id[i] for i in k["nodes"] if by_id[i]["scope"] == "blocks.1" and not by_id[i]["bwd"])
    click(page, f"n{node['id']}")
    page.wait_for("document.getElementById('kernel-source') !== null", timeout=10)
    details = page.evaluate("flameViewer.details()")
    for text in (node["name"], node["type"], node["loc"], "blocks.1", f"kernel K{k['index']} {k['name']}"):
        assert text in details
    assert page.evaluate("document.getElementById('kernel-source').textContent") == k["source"]
    shot(page, "viewer_small_node.png")

    # the search finds an op: typed into the search box, then its first result clicked
    wanted = sorted(n["id"] for n in model["nodes"] if n["op"] == "conv2d_weight_grad")
    assert len(wanted) == 2
    page.evaluate("document.getElementById('search').focus()")
    page.type_text("conv2d_weight_grad")
    page.wait_for("document.querySelectorAll('#results .row').length > 0", timeout=10)
    rows = page.evaluate("[...document.querySelectorAll('#results .row')].map(r => +r.dataset.id)")
    assert sorted(rows) == wanted
    page.evaluate("document.querySelector('#results .row').click()")
    first = by_id[rows[0]]
    page.wait_for(f"flameViewer.visible().includes('n{first['id']}')", timeout=10)
    details = page.evaluate("flameViewer.details()")
    assert first["name"] in details and "backward" in details and first["rule"] in details
    assert f"scope\t{first['scope']}" in details

    # the memory timeline names the arena's peak
    readout = page.evaluate("document.getElementById('mem-readout').textContent")
    assert f"arena {fmt_bytes(sched.plan.peak)}" in readout
    assert page.evaluate("document.querySelectorAll('#mem path').length") == 2
    shot(page, "viewer_small_search.png")
    assert page.errors == []
    assert set(page.requests) == {url}, "the page must not fetch anything"


def test_sd15_unet_training_page_opens_collapsed_in_bounded_time(browser, tmp_path, capsys):
    path = tmp_path / "unet.html"
    t0 = time.monotonic()
    assert cli.main(["--model", "sd15-unet", "--grad", "--summary", "--html", str(path)]) == 0
    built = time.monotonic() - t0
    capsys.readouterr()
    assert built < 60, f"generating the SD 1.5 UNet page took {built:.0f} s"
    page, ready = open_page(browser, path, timeout=30)
    assert ready < 30
    n = page.evaluate("flameViewer.model.nodes.length")
    assert n > 8000
    visible = page.evaluate("flameViewer.visible()")
    assert {"s:down_blocks", "s:mid_block", "s:up_blocks"} <= set(visible) and len(visible) < 100
    t0 = time.monotonic()
    page.evaluate("flameViewer.expand('up_blocks.1.attentions.0')")
    assert time.monotonic() - t0 < 15
    assert "s:up_blocks.1.attentions.0.transformer_blocks" in page.evaluate("flameViewer.visible()")
    from flame.models.configs import SD15_UNET
    from flame.models.unet import UNet2DConditionModel
    with flame.nn.init.shape_only():
        convs = sum(isinstance(m, nn.Conv2d) for m in UNet2DConditionModel(SD15_UNET).modules())
    # one weight gradient per convolution, each found by the search
    assert len(page.evaluate("flameViewer.search('conv2d_weight_grad')")) == convs > 90
    shot(page, "viewer_sd15_unet.png")
    assert page.errors == []


def test_graphviz_renders_the_dot(small, tmp_path):
    import shutil
    import subprocess
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed (the structural DOT tests above still ran)")
    path = tmp_path / "net.dot"
    path.write_text(to_dot(small[1]))
    r = subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('class="cluster"') == len(small[1]["scopes"]) - 1
