// mount.js: the entry point: find each widget's element and data (a Payload, schema.js) by the
// ids this render gave them, and draw. _html.py calls mountAll after all the files.
// Defines: mount, mountAll.
// Uses: util.js: fmt, beamColor; diagram.js: layout, headTable, drawDiagram, beamsThrough, paint;
//   routemap.js: drawRouteMap; heads.js: buildHeadGrid, paintGrid, clearHeatmap, showHeatmap;
//   panels.js: titleText, buildSkeleton, keyLines, buildKey, buildLegend, clearInfo, showNode,
//   showHead, showLink, showTooltip, hideTooltip, revealInfo; strip.js: buildStrip;
//   export.js: exportSvg, exportPng.

// opts.prompt: name the prompt (batch_index) in the title: the page shows several prompts.
function mount(root, data, opts) {
  const ui = buildSkeleton(root, data, opts);
  const perHead = data.links.some(function (l) { return l.head !== null; });
  // beam: the filter's beam; node / head / link: what is selected (one at a time); colour: how
  // links are coloured; strip: the position hovered in the token strip.
  const state = {beam: null, node: null, head: null, link: null,
                 colour: perHead ? "head" : "beam", strip: null};
  const beamNodes = data.beams.map(function (b) { return new Set(b.node_ids); });
  const name = "rat_lens_trace_" + data.meta.target_node_id;  // e.g. rat_lens_trace_L1_P7
  const lay = layout(data), heads = headTable(lay.graph.links);
  const handlers = {
    node: function (n) {
      select(n.id, null, null);
      showNode(ui, data, n, beamsThrough(beamNodes, n.id));
      clearHeatmap(ui);
      revealInfo(ui);
    },
    link: function (l) {
      select(null, l.key, l.index);
      showLink(ui, data, l);
      showHeatmap(ui, data, lay.graph.links, l.key, l);
      revealInfo(ui);
    },
    background: function () {
      select(null, null, null);
      clearInfo(ui);
      clearHeatmap(ui);
    },
    hover: function (event, text) { showTooltip(ui, event, text); },
    leave: function () { hideTooltip(ui); },
  };
  // A layers trace opens on its route map (routemap.js), the Sankey one click away; a chain has
  // the Sankey only. Both are drawn once; the view buttons show one.
  const routes = ui.routes ? drawRouteMap(ui.routes, data, lay.graph, handlers) : null;
  const sankey = drawDiagram(ui.diagram, data, lay, handlers);
  let view = routes || sankey;
  function showView(which) {
    view = which === "routes" && routes ? routes : sankey;
    if (ui.routes) ui.routes.style("display", view === routes ? null : "none");
    ui.diagram.style("display", view === sankey ? null : "none");
    ui.viewButtons.classed("is-on", function (v) { return v === which; })
      .attr("aria-pressed", function (v) { return v === which; });
    ui.reset.style("display", view === sankey ? null : "none");
    ui.keyColour(state.colour, view === routes);
    if (view === sankey) sankey.first();
  }

  function select(node, head, link) {
    state.node = node;
    state.head = head;
    state.link = link;
    repaint();
  }
  // A head from the grid or the key: its links light up, its attention shows; again: cleared.
  function pickHead(key) {
    if (state.head === key && state.link === null) {
      select(null, null, null);
      clearInfo(ui);
      clearHeatmap(ui);
      return;
    }
    select(null, key, null);
    const found = heads.filter(function (h) { return h.key === key; });
    if (found.length) showHead(ui, data, found[0]);
    else clearInfo(ui);
    showHeatmap(ui, data, lay.graph.links, key, null);
    revealInfo(ui);
  }
  function repaint() {
    [routes, sankey].forEach(function (v) { if (v) paint(v, heads, beamNodes, state); });
    paintGrid(ui, state);
    if (ui.legendItems) {
      ui.legendItems.classed("is-on", function (b, i) { return i === state.beam; });
    }
  }
  // Choosing a beam (dropdown or legend) clears the selection: it may not be on that beam.
  function pickBeam(b) {
    state.beam = b;
    ui.select.property("value", b === null ? "all" : String(b));
    select(null, null, null);
    clearInfo(ui);
    clearHeatmap(ui);
  }
  // What an export puts under the diagram: the colours shown, and the key.
  function exportExtra() {
    const n = data.beams.length;
    const swatches = state.colour === "head"
      ? heads.map(function (h) {
          return {color: h.color, text: h.name + " " + fmt(h.mass, 2)};
        })
      : data.beams.map(function (b, i) {
          return {color: beamColor(i, n), text: "beam #" + (i + 1) + " score " +
            fmt(b.score_norm)};
        }).filter(function (s, i) { return state.beam === null || state.beam === i; });
    return {title: titleText(data, opts), swatches: swatches,
            notes: keyLines(data, state.colour, view === routes)};
  }
  ui.select.on("change", function () { pickBeam(this.value === "all" ? null : +this.value); });
  if (ui.colour) {
    ui.colour.on("change", function () {
      state.colour = this.value;
      ui.keyColour(state.colour, view === routes);
      repaint();
    });
  }
  buildLegend(ui, data, function (b) { pickBeam(state.beam === b ? null : b); });
  buildHeadGrid(ui, data, heads, pickHead);
  buildKey(ui, data, heads, pickHead);
  ui.viewButtons.on("click", function (event, v) { showView(v); });
  showView(routes ? "routes" : "sankey");
  ui.reset.on("click", sankey.fit);
  ui.clear.on("click", function () { pickBeam(null); });
  ui.svgButton.on("click", function () { exportSvg(ui, view, name, exportExtra()); });
  ui.pngButton.on("click", function () { exportPng(ui, view, name, exportExtra()); });
  // Hovering the strip only marks nodes: no full repaint per token (2,000 links on long chains).
  function stripAt(pos) {
    state.strip = pos;
    [routes, sankey].forEach(function (v) {
      if (v) v.nodes.classed("is-strip", function (n) { return n.position === pos; });
    });
  }
  // Escape clears the selection: on the page (a click on an SVG element leaves the focus on the
  // body) and inside the widget alike.
  d3.select(document).on("keydown." + root.attr("id"), function (event) {
    if (event.key === "Escape") handlers.background();
  });
  buildStrip(ui, data, lay.graph.links, {
    hover: stripAt,
    leave: function () { stripAt(null); },
  });
  repaint();
  clearInfo(ui);
  clearHeatmap(ui);
  root.attr("data-ratlens-ready", "1");
}

// One failing widget must not keep the others on the page from drawing. The prompt is named in
// every title when one of the widgets comes from a prompt other than the first of a batch.
function mountAll(ids) {
  const widgets = ids.map(function (uid) {
    const root = d3.select(document.getElementById("ratlens-" + uid));
    try {
      return {root: root,
              data: JSON.parse(document.getElementById("ratlens-data-" + uid).textContent)};
    } catch (err) {
      return {root: root, error: err};
    }
  });
  const opts = {prompt: widgets.some(function (w) {
    return w.data && w.data.meta && w.data.meta.batch_index > 0;
  })};
  widgets.forEach(function (w) {
    try {
      if (w.error) throw w.error;
      mount(w.root, w.data, opts);
    } catch (err) {
      w.root.append("div").attr("class", "ratlens-error")
        .text("rat_lens could not draw this trace: " + err);
      console.error(err);
    }
  });
}
