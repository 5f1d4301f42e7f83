// flame graph viewer: draws the model embedded in the page (flame/viewer/export.py) with
// Cytoscape.js and its dagre layout. Module scopes are boxes that open and close; only what
// is visible is laid out, so a UNet training graph of thousands of nodes opens collapsed to
// its top-level modules and stays quick. window.flameViewer is the page's API (tests use it).
(function () {
  "use strict";
  const M = JSON.parse(document.getElementById("flame-data").textContent);
  const OPTS = JSON.parse(document.getElementById("flame-options").textContent);
  const COLORS = {input: "#9be39b", param: "#e6e68a", const: "#d9d9d9", library: "#f5a65b",
                  reduce: "#c39be3", movement: "#c8c8c8", elementwise: "#8ec5f0"};
  const $ = (id) => document.getElementById(id);
  const byId = new Map(M.nodes.map((n) => [n.id, n]));
  const byName = new Map(M.nodes.map((n) => [n.name, n.id]));
  const scopes = M.scopes;
  const users = new Map(M.nodes.map((n) => [n.id, []]));
  for (const [a, b] of M.edges) users.get(a).push(b);

  // each node's chain of enclosing scopes, outermost first ("" is the root, always open)
  const chainCache = new Map();
  function chain(path) {
    if (chainCache.has(path)) return chainCache.get(path);
    const out = [];
    for (let p = path; p; p = scopes[p].parent) out.unshift(p);
    chainCache.set(path, out);
    return out;
  }
  // members of a kernel inside one scope: drawn as one box when there are two or more
  const pieceSize = new Map();
  for (const n of M.nodes) {
    if (n.kernel === null) continue;
    const key = n.kernel + "|" + n.scope;
    pieceSize.set(key, (pieceSize.get(key) || 0) + 1);
  }

  const expanded = new Set();
  let kernelBoxes = true;
  let selected = null;      // {type: "node"|"scope"|"kernel", key}
  let cy = null;

  function fmtBytes(n) {
    for (const [u, k] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]])
      if (n >= k) return (n / k).toFixed(1) + " " + u;
    return n + " B";
  }
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "onclick") e.addEventListener("click", v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined) e.append(k);
    return e;
  }
  const last = (path) => path.slice(path.lastIndexOf(".") + 1);

  // ---- which elements are visible, and the Cytoscape elements for them
  function repOf(n) {
    for (const p of chain(n.scope)) if (!expanded.has(p)) return "s:" + p;
    return "n" + n.id;
  }
  function textSize(lines, px) {
    const w = Math.max(...lines.map((l) => l.length));
    return {w: Math.max(40, w * px * 0.62 + 14), h: lines.length * px * 1.3 + 10};
  }
  function elements() {
    const nodes = [], edges = [], rep = new Map(), groups = new Set(), collapsed = new Set();
    const groupOf = (scope) => {   // the compound node of an open scope (and its parents)
      if (!scope) return undefined;
      if (!groups.has(scope)) {
        groups.add(scope);
        const s = scopes[scope];
        nodes.push({group: "nodes", classes: "group", data: {id: "x:" + scope, scope,
          label: scope + "  (" + s.fwd + " fwd, " + s.bwd + " bwd)", parent: groupOf(s.parent)}});
      }
      return "x:" + scope;
    };
    for (const n of M.nodes) {
      const r = repOf(n);
      rep.set(n.id, r);
      if (r[0] === "s") {
        if (collapsed.has(r)) continue;
        collapsed.add(r);
        const p = r.slice(2), s = scopes[p];
        const lines = [last(p), s.count + " nodes", s.fwd + " fwd · " + s.bwd + " bwd"];
        const sz = textSize(lines, 12);
        nodes.push({group: "nodes", classes: "scope", data: {id: r, scope: p, label: lines.join("\n"),
          w: sz.w, h: sz.h, parent: groupOf(s.parent)}});
        continue;
      }
      let parent = groupOf(n.scope);
      if (kernelBoxes && n.kernel !== null && pieceSize.get(n.kernel + "|" + n.scope) >= 2) {
        const kid = "k:" + n.kernel + "|" + n.scope;
        if (!groups.has(kid)) {
          groups.add(kid);
          nodes.push({group: "nodes", classes: "kpiece", data: {id: kid, kernel: n.kernel,
            label: "K" + n.kernel + " " + M.kernels[n.kernel].name, parent}});
        }
        parent = kid;
      }
      const lines = [n.name, n.op + " " + n.type];
      const sz = textSize(lines, 10);
      nodes.push({group: "nodes", classes: "op" + (n.bwd ? " bwd" : "") + (n.output ? " out" : ""),
        data: {id: r, nid: n.id, label: lines.join("\n"), color: COLORS[n.cat], w: sz.w, h: sz.h, parent}});
    }
    const agg = new Map();
    for (const [a, b] of M.edges) {
      const ra = rep.get(a), rb = rep.get(b);
      if (ra === rb) continue;
      const key = ra + ">" + rb;
      const e = agg.get(key);
      if (e) e.count += 1;
      else agg.set(key, {source: ra, target: rb, count: 1, bwd: byId.get(b).bwd});
    }
    let i = 0;
    for (const e of agg.values()) {
      edges.push({group: "edges", classes: e.bwd ? "bwd" : "", data: {id: "e" + i++, source: e.source,
        target: e.target, count: e.count, width: Math.min(6, 1 + Math.log2(e.count))}});
    }
    return nodes.concat(edges);
  }

  const STYLE = [
    {selector: "node", style: {"font-family": "monospace", "text-wrap": "wrap", "label": "data(label)"}},
    {selector: "node.op", style: {"shape": "round-rectangle", "width": "data(w)", "height": "data(h)",
      "background-color": "data(color)", "font-size": 10, "text-valign": "center", "text-halign": "center",
      "border-width": 1, "border-color": "#555"}},
    {selector: "node.op.bwd", style: {"border-style": "dashed", "background-opacity": 0.45, "font-style": "italic"}},
    {selector: "node.op.out", style: {"border-width": 2.5, "border-color": "#222"}},
    {selector: "node.scope", style: {"shape": "round-rectangle", "width": "data(w)", "height": "data(h)",
      "background-color": "#dfe4f5", "border-width": 2, "border-color": "#5a6a9a", "font-size": 12,
      "font-weight": "bold", "text-valign": "center", "text-halign": "center"}},
    {selector: "node.group", style: {"shape": "round-rectangle", "background-color": "#f3f4fa",
      "background-opacity": 0.6, "border-color": "#8c93b5", "border-width": 1.5, "font-size": 11,
      "text-valign": "top", "text-halign": "center", "padding": 12, "color": "#3a4270"}},
    {selector: "node.kpiece", style: {"shape": "round-rectangle", "background-color": "#fff4dc",
      "background-opacity": 0.7, "border-color": "#d08a20", "border-style": "dotted", "border-width": 1.5,
      "font-size": 9, "text-valign": "bottom", "text-halign": "center", "padding": 6, "color": "#9a5b00"}},
    {selector: "edge", style: {"curve-style": "bezier", "target-arrow-shape": "triangle", "arrow-scale": 0.7,
      "line-color": "#8a8a8a", "target-arrow-color": "#8a8a8a", "width": "data(width)"}},
    {selector: "edge.bwd", style: {"line-style": "dashed", "line-color": "#d08888", "target-arrow-color": "#d08888"}},
    {selector: ".kmate", style: {"border-color": "#e07000", "border-width": 3}},
    {selector: ".match", style: {"underlay-color": "#ffd400", "underlay-opacity": 0.7, "underlay-padding": 5}},
    {selector: ".sel", style: {"border-color": "#e00000", "border-width": 4}},
    {selector: "edge.near", style: {"line-color": "#e00000", "target-arrow-color": "#e00000"}},
  ];

  let relayoutTimer = 0;
  function redraw(focus) {
    const t0 = performance.now();
    const els = elements();
    cy.startBatch();
    cy.elements().remove();
    cy.add(els);
    cy.endBatch();
    const n = cy.nodes().length;
    cy.layout({name: "dagre", rankDir: "TB", nodeSep: 14, rankSep: 26, edgeSep: 6, fit: false,
               animate: false}).run();
    const target = focus ? cy.getElementById(focus) : null;
    if (target && target.length) {
      cy.fit(target, 40);
      if (cy.zoom() < 0.5) {   // too big to read whole: readable size, its top in view
        const bb = target.boundingBox();
        cy.zoom(0.5);
        cy.pan({x: cy.width() / 2 - 0.5 * (bb.x1 + bb.x2) / 2, y: 30 - 0.5 * bb.y1});
      }
    } else cy.fit(undefined, 30);
    cy.nodes().style("text-opacity", 1);
    applySelection();
    applyMatches();
    renderOutline();
    $("status").textContent = n + " boxes visible (" + M.nodes.length + " nodes in all) · laid out in " +
      Math.round(performance.now() - t0) + " ms";
  }

  // ---- open and close scopes
  function expand(path, focus = true) {
    if (!(path in scopes)) throw new Error("no scope " + JSON.stringify(path));
    for (const p of chain(path)) expanded.add(p);
    redraw(focus ? "x:" + path : null);
  }
  function collapse(path) {
    for (const p of [...expanded]) if (p === path || p.startsWith(path + ".")) expanded.delete(p);
    redraw("s:" + path);
  }
  function collapseAll() { expanded.clear(); redraw(null); }

  // ---- selection and the details panel
  function applySelection() {
    cy.elements().removeClass("sel kmate near");
    if (!selected) return;
    if (selected.type === "node") {
      const n = byId.get(selected.key);
      const r = cy.getElementById(repOf(n));
      r.addClass("sel");
      if (r.hasClass("op")) r.connectedEdges().addClass("near");
      if (n.kernel !== null)
        for (const id of M.kernels[n.kernel].nodes) {
          const m = byId.get(id);
          if (m && id !== n.id) cy.getElementById(repOf(m)).addClass("kmate");
        }
    } else if (selected.type === "scope") {
      cy.getElementById("s:" + selected.key).addClass("sel");
      cy.getElementById("x:" + selected.key).addClass("sel");
    }
    drawTimeline();
  }
  function ref(id) {
    const n = byId.get(id);
    return n ? el("a", {class: "ref", onclick: () => reveal(id)}, n.name) : String(id);
  }
  function kv(rows) {
    return el("table", {class: "kv"}, ...rows.filter((r) => r[1] !== null && r[1] !== undefined && r[1] !== "")
      .map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
  }
  function joined(items) {
    const span = el("span", {});
    items.forEach((x, i) => { if (i) span.append(", "); span.append(x); });
    return span;
  }
  function showNode(id) {
    const n = byId.get(id);
    selected = {type: "node", key: id};
    const d = $("details");
    d.replaceChildren();
    d.append(el("h3", {}, n.name + " = " + n.op + n.attrs));
    const argRefs = n.args.map((a) => (byName.has(a) ? ref(byName.get(a)) : a));
    d.append(kv([
      ["type", n.type], ["shape", "[" + n.shape.join(", ") + "]"], ["dtype", n.dtype],
      ["pass", n.bwd ? "backward" : "forward"],
      ["autodiff rule", n.rule], ["source line", n.loc],
      ["scope", n.scope ? el("a", {class: "ref", onclick: () => showScope(n.scope)}, n.scope) : "(top level)"],
      ["kind", n.kind], ["inputs", argRefs.length ? joined(argRefs) : null],
      ["users", users.get(id).length ? joined(users.get(id).slice(0, 40).map(ref)) : null],
      ["output", n.output ? "returned by the graph" : null],
      ["recomputed", n.recomputed_in && n.recomputed_in.length ? el("span", {}, "also inside ",
        ...n.recomputed_in.map(ki => el("a", {class: "ref", onclick: () => showKernel(ki)}, "K" + ki + " "))) : null],
      ["memory", n.mem ? fmtBytes(n.mem.bytes) + " at arena offset " + fmtBytes(n.mem.offset) +
        ", live steps " + n.mem.first + "–" + n.mem.last + (n.mem.shares ? " (shares " + n.mem.shares + "'s buffer)" : "") : null],
    ]));
    if (n.kernel !== null) kernelSection(d, n.kernel, n);
    applySelection();
  }
  function kernelSection(d, ki, node) {
    const k = M.kernels[ki];
    d.append(el("h3", {}, "kernel K" + ki + " " + k.name));
    d.append(kv([
      ["kind", {E: "elementwise", R: "reduction / row", L: "library call"}[k.kind] || k.kind],
      ["step", String(k.step)], ["what", k.note],
      ["this node", node ? (node.id === k.root ? "the kernel's output" : node.fused_by ? "fused by rule " + node.fused_by : null) : null],
      ["members", joined(k.nodes.slice(0, 60).map(ref))],
      ["not fused", k.refused.length ? el("div", {}, ...k.refused.map(([id, why]) => el("div", {}, ref(id), ": " + why))) : null],
    ]));
    if (k.source) d.append(el("pre", {class: "src", id: "kernel-source"}, k.source));
  }
  function showKernel(ki) {
    selected = {type: "kernel", key: ki};
    const d = $("details");
    d.replaceChildren();
    kernelSection(d, ki, null);
    applySelection();
  }
  function showScope(path) {
    selected = {type: "scope", key: path};
    const s = scopes[path], d = $("details");
    d.replaceChildren();
    d.append(el("h3", {}, path || "(top level)"));
    const ops = new Map();
    const walk = (p) => { for (const id of scopes[p].nodes) { const o = byId.get(id).op; ops.set(o, (ops.get(o) || 0) + 1); }
                          scopes[p].children.forEach(walk); };
    walk(path);
    const top = [...ops.entries()].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([o, c]) => o + " " + c).join(", ");
    d.append(kv([["nodes", s.count + " (" + s.fwd + " forward, " + s.bwd + " backward)"],
                 ["ops", top], ["children", s.children.length ? joined(s.children.map((c) =>
                   el("a", {class: "ref", onclick: () => { expand(c); showScope(c); }}, last(c)))) : null]]));
    if (path) d.append(expanded.has(path) ? el("button", {onclick: () => { collapse(path); showScope(path); }}, "close this module")
                                        : el("button", {onclick: () => { expand(path); showScope(path); }}, "open this module"));
    applySelection();
  }
  // show a node wherever it is: open its scopes, select it, centre it
  function reveal(id) {
    const n = byId.get(id);
    if (!n) throw new Error("no node " + id);
    let changed = false;
    for (const p of chain(n.scope)) if (!expanded.has(p)) { expanded.add(p); changed = true; }
    if (changed) redraw(null);
    showNode(id);
    const e = cy.getElementById("n" + id);
    cy.zoom({level: Math.max(cy.zoom(), 1.0), position: e.position()});
    cy.center(e);
  }

  // ---- search by op, name or scope
  let matches = [];
  function search(q) {
    q = q.trim().toLowerCase();
    matches = [];
    if (q) {
      for (const n of M.nodes) {
        if (n.op.toLowerCase() === q || n.name.toLowerCase().includes(q) || n.scope.toLowerCase().includes(q) ||
            n.op.toLowerCase().includes(q) || (n.rule || "").toLowerCase().includes(q)) matches.push(n.id);
      }
    }
    const box = $("results");
    box.replaceChildren();
    if (q) box.append(el("div", {class: "dim"}, matches.length + " match" + (matches.length === 1 ? "" : "es")));
    for (const id of matches.slice(0, 200)) {
      const n = byId.get(id);
      box.append(el("div", {class: "row", "data-id": String(id), onclick: () => reveal(id)},
        n.name + " ", el("span", {}, n.op), el("span", {class: "dim"}, " " + (n.scope || "") + (n.bwd ? " ∇" : ""))));
    }
    applyMatches();
    return matches.slice();
  }
  function applyMatches() {
    cy.elements().removeClass("match");
    const reps = new Set(matches.map((id) => repOf(byId.get(id))));
    for (const r of reps) cy.getElementById(r).addClass("match");
  }

  // ---- the outline of scopes (mirrors what is open in the graph)
  function renderOutline() {
    const box = $("outline");
    box.replaceChildren();
    const row = (p, depth) => {
      const s = scopes[p], open = expanded.has(p), leafish = s.children.length === 0;
      box.append(el("div", {class: "row", style: "padding-left:" + (depth * 12) + "px", "data-scope": p,
        onclick: () => { open ? collapse(p) : expand(p); showScope(p); }},
        el("span", {class: "tree-toggle"}, open ? "▾" : "▸"), last(p) + " ",
        el("span", {class: "dim"}, String(s.count) + (leafish ? "" : " · " + s.children.length + " inside"))));
      if (open) for (const c of s.children) row(c, depth + 1);
    };
    for (const c of scopes[""].children) row(c, 0);
  }

  // ---- memory: arena bytes in use over the schedule's steps
  function drawTimeline() {
    const svg = $("mem"), mem = M.memory;
    if (!mem) { $("mem-readout").textContent = "no memory plan (export with a schedule)"; return; }
    const W = Math.max(200, svg.clientWidth || 800), H = 112, pad = 4;
    const steps = mem.top.length, peak = Math.max(1, mem.peak);
    const x = (i) => pad + (W - 2 * pad) * i / Math.max(1, steps - 1);
    const y = (b) => H - pad - (H - 2 * pad - 10) * b / peak;
    const path = (arr) => arr.map((b, i) => (i ? "L" : "M") + x(i).toFixed(1) + " " + y(b).toFixed(1)).join("");
    let band = "";
    if (selected && selected.type === "node" && byId.get(selected.key).mem) {
      const m = byId.get(selected.key).mem;
      band = `<rect x="${x(m.first) - 1}" y="0" width="${Math.max(2, x(m.last) - x(m.first) + 2)}" height="${H}" fill="#ffb3b3" opacity="0.5"/>`;
    } else if (selected && selected.type === "kernel") {
      const s = M.kernels[selected.key].step;
      band = `<rect x="${x(s) - 1}" y="0" width="2" height="${H}" fill="#e00"/>`;
    }
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.innerHTML = band +
      `<path d="${path(mem.live)}L${x(steps - 1)} ${H - pad}L${x(0)} ${H - pad}Z" fill="#bfe3c3" stroke="#2f8a3a" stroke-width="1"/>` +
      `<path d="${path(mem.top)}" fill="none" stroke="#4a68b0" stroke-width="1.2"/>` +
      `<line x1="0" x2="${W}" y1="${y(peak)}" y2="${y(peak)}" stroke="#b00" stroke-dasharray="4 3"/>` +
      `<text x="${W - pad}" y="${y(peak) - 2}" text-anchor="end" font-size="10" fill="#b00">peak ${mem.peak_text}</text>` +
      `<line id="mem-cursor" x1="-10" x2="-10" y1="0" y2="${H}" stroke="#333"/>`;
    $("mem-readout").textContent = "memory: arena " + mem.peak_text + " (naive " + mem.naive_text + ") over " +
      (steps - 2) + " kernel steps · green: bytes of live buffers · blue line: top of the arena in use · click a step for its kernel";
  }
  function stepAt(evt) {
    const svg = $("mem"), r = svg.getBoundingClientRect(), steps = M.memory.top.length;
    return Math.max(0, Math.min(steps - 1, Math.round((evt.clientX - r.left - 4) / Math.max(1, r.width - 8) * (steps - 1))));
  }
  function timelineEvents() {
    const svg = $("mem");
    if (!M.memory) return;
    svg.addEventListener("mousemove", (evt) => {
      const i = stepAt(evt), mem = M.memory, W = svg.viewBox.baseVal.width;
      const c = $("mem-cursor");
      if (c) { const xx = 4 + (W - 8) * i / Math.max(1, mem.top.length - 1); c.setAttribute("x1", xx); c.setAttribute("x2", xx); }
      $("mem-readout").textContent = "step " + i + " " + mem.steps[i] + ": live " + fmtBytes(mem.live[i]) +
        ", arena top " + fmtBytes(mem.top[i]) + " (peak " + mem.peak_text + ")";
    });
    svg.addEventListener("click", (evt) => {
      const i = stepAt(evt);
      if (i >= 1 && i <= M.kernels.length) { reveal(M.kernels[i - 1].root); showKernel(i - 1); }
    });
  }

  // ---- start
  function init() {
    $("title").textContent = M.name + (M.target ? " · " + M.target : "");
    const s = M.summary;
    $("summary").textContent = s.nodes + " nodes (" + s.fwd + " forward, " + s.bwd + " backward)" +
      (M.kernels.length ? " · " + s.kernels + " kernels, " + s.launches + " launches" : "");
    const legend = $("legend");
    for (const c of M.categories) legend.append(el("span", {style: "background:" + COLORS[c]}, c));
    legend.append(el("span", {class: "bwd"}, "backward (dashed)"));
    cy = cytoscape({container: $("cy"), style: STYLE, minZoom: 0.02, maxZoom: 4, wheelSensitivity: 0.3,
                    textureOnViewport: true, hideEdgesOnViewport: M.nodes.length > 2000, boxSelectionEnabled: false});
    // one handler on the core: a tap on a node also bubbles through its compound parents
    cy.on("tap", (e) => {
      const t = e.target;
      if (t === cy || !t.isNode()) return;
      if (t.hasClass("op")) showNode(t.data("nid"));
      else if (t.hasClass("scope")) { const p = t.data("scope"); expand(p); showScope(p); }
      else if (t.hasClass("group")) showScope(t.data("scope"));
      else if (t.hasClass("kpiece")) showKernel(t.data("kernel"));
    });
    let timer = 0;
    $("search").addEventListener("input", (e) => { clearTimeout(timer); timer = setTimeout(() => search(e.target.value), 150); });
    $("search").addEventListener("keydown", (e) => { if (e.key === "Enter") { const r = search(e.target.value); if (r.length) reveal(r[0]); } });
    $("kboxes").addEventListener("change", (e) => { kernelBoxes = e.target.checked; redraw(null); });
    $("collapse-all").addEventListener("click", collapseAll);
    window.addEventListener("resize", () => { clearTimeout(relayoutTimer); relayoutTimer = setTimeout(drawTimeline, 100); });
    if (M.nodes.length <= OPTS.expand_below) for (const p in scopes) if (p) expanded.add(p);
    redraw(null);
    drawTimeline();
    timelineEvents();
    api.ready = true;
  }

  const api = window.flameViewer = {
    ready: false, model: M,
    expand, collapse, collapseAll, search, reveal, showNode, showKernel, showScope,
    expanded: () => [...expanded],
    visible: () => cy.nodes().map((n) => n.id()),
    // page coordinates of a drawn element's centre (for real mouse clicks)
    pagePosition(id) {
      const e = cy.getElementById(id);
      if (!e.length) throw new Error("not drawn: " + id);
      let p = e.renderedPosition();
      if (p.x < 20 || p.y < 20 || p.x > cy.width() - 20 || p.y > cy.height() - 20) { cy.center(e); p = e.renderedPosition(); }
      const r = $("cy").getBoundingClientRect();
      return {x: r.left + p.x, y: r.top + p.y};
    },
    details: () => $("details").innerText,
  };
  try { init(); } catch (err) { console.error("flame viewer failed to start: " + err.stack); throw err; }
})();
