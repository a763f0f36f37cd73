// strip.js: the token strip: the whole text, wrapped, each token hoverable, in two views (as
// att_viz): what the hovered token attends to, or what attends to it. Hovering a token lights its
// nodes in the diagram. The readout gives the diagram's own edges at the token (head, attention,
// Sankey weight: the numbers the diagram shows) and, for a model trace, the captured attention
// averaged over the traced layers and heads (StripRows, schema.js), each named for what it is.
// Defines: STRIP_SHOWN, buildStrip.
// Uses: util.js: visible, shorten, fmt, weightName, averagedName, tokenAt, nextToken.

const STRIP_SHOWN = 12;  // entries listed in a readout line; the strip itself shades all of them

// links: the diagram's links (diagram.js layout: attention, value, lay, head, source, target).
// on.hover(pos) / on.leave(): light the diagram's nodes at pos, and stop.
function buildStrip(ui, data, links, on) {
  const head = ui.strip.append("div").attr("class", "ratlens-strip-head");
  let view = "to";
  const toButton = head.append("button").attr("type", "button")
    .attr("class", "ratlens-view-to is-on").text("attends to");
  const fromButton = head.append("button").attr("type", "button")
    .attr("class", "ratlens-view-from").text("attended by");
  const edgesOnly = data.strip.source === "edges";
  const averaged = averagedName(data.meta);
  head.append("div").attr("class", "ratlens-strip-source").text(edgesOnly
    ? "Shading and numbers: the traced beams' edges (layer, head, " + weightName(data) +
      "), as on the diagram."
    : "Shading: the captured attention, " + averaged + " (each token's 4 strongest keys), not " +
      "one head's. The first readout line gives the diagram's own edges at the token (head, " +
      weightName(data) + ", Sankey weight).");
  const readout = ui.strip.append("div").attr("class", "ratlens-readout");
  const hint = "Hover a token: " + (edgesOnly ? "its edges on the traced paths" :
    "its edges on the diagram and its strongest attention (" + averaged + ")") +
    "; its nodes light up in the diagram.";
  const box = ui.strip.append("div").attr("class", "ratlens-tokens");

  const onTrace = new Set(data.nodes.map(function (n) { return n.position; }));
  const next = nextToken(data);
  const spans = [];
  data.tokens.forEach(function (token, pos) {
    const text = visible(token), short = shorten(text, 24);
    const span = box.append("span")
      .attr("class", "ratlens-tok" + (onTrace.has(pos) ? " on-trace" : "") +
        (pos === data.meta.target_pos ? " is-target" : "") + (pos === next ? " is-next" : ""))
      .attr("data-pos", pos)
      .attr("title", short === text ? (pos === next ? "the token after the target" : null)
        : text)
      .text(short);
    spans.push(span);
    if (token.indexOf("\n") >= 0) box.append("br");  // keep the text's lines
  });

  const byQuery = d3.group(data.strip.rows, function (r) { return r.query; });
  const byKey = d3.group(data.strip.rows, function (r) { return r.key; });
  const edgesByQuery = d3.group(links, function (l) { return l.target.position; });
  const edgesByKey = d3.group(links, function (l) { return l.source.position; });

  function clear() {
    box.selectAll(".ratlens-tok").classed("is-related", false).classed("is-hover", false)
      .classed("is-edge", false).style("background", null);
    readout.selectAll("*").remove();
    readout.append("div").text(hint);
  }

  function listed(entries, text) {
    const shown = entries.slice(0, STRIP_SHOWN).map(text);
    if (entries.length > STRIP_SHOWN) shown.push("\u2026 " + (entries.length - STRIP_SHOWN) +
      " more");
    return shown.join(", ");
  }

  function hover(pos) {
    clear();
    readout.selectAll("*").remove();
    const rows = ((view === "to" ? byQuery : byKey).get(pos) || []).slice()
      .sort(function (a, b) { return b.weight - a.weight; });
    const other = view === "to" ? "key" : "query";  // the row's end that is not `pos`
    const strongest = new Map();
    rows.forEach(function (r) {
      strongest.set(r[other], Math.max(strongest.get(r[other]) || 0, r.weight));
    });
    strongest.forEach(function (w, p) {
      spans[p].classed("is-related", true)
        .style("background", "rgba(214, 39, 40, " + (0.12 + 0.7 * w).toFixed(3) + ")");
    });
    spans[pos].classed("is-hover", true);
    const verb = view === "to" ? " attends to: " : " is attended by: ";
    const none = view === "to" ? " attends to nothing" : " is attended by nothing";
    // The diagram's edges at this token, with the diagram's numbers.
    const edges = ((view === "to" ? edgesByQuery : edgesByKey).get(pos) || []).slice()
      .sort(function (a, b) {
        return (b.attention || 0) - (a.attention || 0) || b.value - a.value;
      });
    const end = function (l) { return view === "to" ? l.source.position : l.target.position; };
    edges.forEach(function (l) { spans[end(l)].classed("is-edge", true); });
    const name = tokenAt(data, pos, 24);
    readout.append("div").attr("class", "ratlens-readout-edges").text("On the diagram, " + name +
      (edges.length ? verb + listed(edges, function (l) {
        return tokenAt(data, end(l), 16) + " " + (l.attention === null ? "?"
          : fmt(l.attention, 2)) + " (" + l.name + ", Sankey " +
          fmt(l.value, 3) + ")";
      }) : none + " on the traced paths"));
    if (!edgesOnly) {
      readout.append("div").attr("class", "ratlens-readout-mean").text(
        "Captured attention (" + averaged + "): " + name + (rows.length ? verb +
          listed(rows, function (r) { return tokenAt(data, r[other], 16) + " " +
            fmt(r.weight, 2); }) : none + " above the kept weights"));
    }
  }

  box.on("mouseover", function (event) {
    const pos = event.target.getAttribute && event.target.getAttribute("data-pos");
    if (pos !== null && pos !== undefined) {
      hover(+pos);
      on.hover(+pos);
    }
  });
  box.on("mouseleave", function () { clear(); on.leave(); });
  function setView(which) {
    view = which;
    toButton.classed("is-on", view === "to");
    fromButton.classed("is-on", view === "from");
    clear();
  }
  toButton.on("click", function () { setView("to"); });
  fromButton.on("click", function () { setView("from"); });
  clear();
}
