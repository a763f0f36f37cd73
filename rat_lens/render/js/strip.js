// strip.js: the token strip: the whole text, each token hoverable, in two views (as att_viz):
// what the hovered token attends to, or what attends to it. Rows are StripRows (schema.js):
// {query, key, weight, layer, head}; with strip.source "edges" they are the traced edges only,
// and the readout says so.
// Defines: STRIP_SHOWN, buildStrip.
// Uses: util.js: visible, shorten, fmt, edgeName, tokenAt.

const STRIP_SHOWN = 12;  // rows listed in the readout; the strip itself shades all of them

function buildStrip(ui, data) {
  const head = ui.strip.append("div").attr("class", "ratlens-strip-head");
  let view = "to";
  const toButton = head.append("button").attr("type", "button")
    .attr("class", "ratlens-view-to is-on").text("attends to");
  const fromButton = head.append("button").attr("type", "button")
    .attr("class", "ratlens-view-from").text("attended by");
  const edgesOnly = data.strip.source === "edges";
  const hint = "Hover a token: " + (edgesOnly ? "its edges on the traced paths." :
    "its strongest attention in the traced layers.");
  const readout = head.append("div").attr("class", "ratlens-readout").text(hint);
  const box = ui.strip.append("div").attr("class", "ratlens-tokens");

  const onTrace = new Set(data.nodes.map(function (n) { return n.position; }));
  const spans = [];
  data.tokens.forEach(function (token, pos) {
    const text = visible(token), short = shorten(text, 24);
    const span = box.append("span")
      .attr("class", "ratlens-tok" + (onTrace.has(pos) ? " on-trace" : "") +
        (pos === data.meta.target_pos ? " is-target" : ""))
      .attr("data-pos", pos)
      .attr("title", short === text ? null : text)
      .text(short);
    spans.push(span);
    if (token.indexOf("\n") >= 0) box.append("br");  // keep the text's lines
  });

  const byQuery = d3.group(data.strip.rows, function (r) { return r.query; });
  const byKey = d3.group(data.strip.rows, function (r) { return r.key; });

  function clear() {
    box.selectAll(".ratlens-tok").classed("is-related", false).classed("is-hover", false)
      .style("background", null);
    readout.text(hint);
  }

  function hover(pos) {
    clear();
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
    const listed = rows.slice(0, STRIP_SHOWN).map(function (r) {
      return tokenAt(data, r[other], 16) + " " + fmt(r.weight, 2) + " (" +
        edgeName(r.layer, [r.head]) + ")";
    });
    if (rows.length > STRIP_SHOWN) listed.push("\u2026 " + (rows.length - STRIP_SHOWN) + " more");
    readout.text(tokenAt(data, pos, 24) + (rows.length ? verb + listed.join(", ") :
      (view === "to" ? " attends to nothing" : " is attended by nothing") +
      (edgesOnly ? " on the traced paths" : " above the kept weights")));
  }

  box.on("mouseover", function (event) {
    const pos = event.target.getAttribute && event.target.getAttribute("data-pos");
    if (pos !== null && pos !== undefined) hover(+pos);
  });
  box.on("mouseleave", clear);
  function setView(next) {
    view = next;
    toButton.classed("is-on", view === "to");
    fromButton.classed("is-on", view === "from");
    clear();
  }
  toButton.on("click", function () { setView("to"); });
  fromButton.on("click", function () { setView("from"); });
}
