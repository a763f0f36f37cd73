// mount.js: the entry point: find each widget's element and data (a Payload, schema.js) by the
// ids this render gave them, and draw. _html.py calls mountAll after all the files.
// Defines: mount, mountAll.
// Uses: diagram.js: drawDiagram, beamsThrough, paint; panels.js: buildSkeleton, buildLegend,
//   clearInfo, showNode, showLink, showTooltip, hideTooltip; strip.js: buildStrip;
//   export.js: exportSvg, exportPng.

function mount(root, data) {
  const ui = buildSkeleton(root, data);
  const state = {beam: null, node: null};
  const beamNodes = data.beams.map(function (b) { return new Set(b.node_ids); });
  const name = "rat_lens_trace_" + data.meta.target_node_id;  // e.g. rat_lens_trace_L1_P7
  const view = drawDiagram(ui, data, {
    node: function (n) {
      state.node = n.id;
      repaint();
      showNode(ui, data, n, beamsThrough(beamNodes, n.id));
    },
    link: function (l) { showLink(ui, data, l); },
    background: function () {
      state.node = null;
      repaint();
      clearInfo(ui);
    },
    hover: function (event, text) { showTooltip(ui, event, text); },
    leave: function () { hideTooltip(ui); },
  });

  function repaint() {
    paint(view, beamNodes, state);
    if (ui.legendItems) {
      ui.legendItems.classed("is-on", function (b, i) { return i === state.beam; });
    }
  }
  // Choosing a beam (dropdown or legend) clears the clicked node: it may not be on that beam.
  function pickBeam(b) {
    state.beam = b;
    state.node = null;
    ui.select.property("value", b === null ? "all" : String(b));
    repaint();
    clearInfo(ui);
  }
  ui.select.on("change", function () { pickBeam(this.value === "all" ? null : +this.value); });
  buildLegend(ui, data, function (b) { pickBeam(state.beam === b ? null : b); });
  ui.reset.on("click", view.fit);
  ui.clear.on("click", function () { pickBeam(null); });
  ui.svgButton.on("click", function () { exportSvg(ui, view, name); });
  ui.pngButton.on("click", function () { exportPng(ui, view, name); });
  buildStrip(ui, data);
  repaint();
  clearInfo(ui);
  root.attr("data-ratlens-ready", "1");
}

// One failing widget must not keep the others on the page from drawing.
function mountAll(ids) {
  ids.forEach(function (uid) {
    const root = d3.select(document.getElementById("ratlens-" + uid));
    try {
      mount(root, JSON.parse(document.getElementById("ratlens-data-" + uid).textContent));
    } catch (err) {
      root.append("div").attr("class", "ratlens-error")
        .text("rat_lens could not draw this trace: " + err);
      console.error(err);
    }
  });
}
