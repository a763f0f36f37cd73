// The token strip: the whole text, each token hoverable, in two views (as att_viz): what the
// hovered token attends to, or what attends to it. Rows are [query, key, weight, layer, head];
// with strip.source "edges" they are the traced edges only, and the readout says so.

var STRIP_SHOWN = 12;  // rows listed in the readout; the strip itself shades all of them

function buildStrip(ui, data) {
  var head = ui.strip.append("div").attr("class", "ratlens-strip-head");
  var view = "to";
  var toButton = head.append("button").attr("type", "button").attr("class", "ratlens-view-to is-on")
    .text("attends to");
  var fromButton = head.append("button").attr("type", "button").attr("class", "ratlens-view-from")
    .text("attended by");
  var edgesOnly = data.strip.source === "edges";
  var hint = "Hover a token: " + (edgesOnly ? "its edges on the traced paths." :
    "its strongest attention in the traced layers.");
  var readout = head.append("div").attr("class", "ratlens-readout").text(hint);
  var box = ui.strip.append("div").attr("class", "ratlens-tokens");

  var onTrace = new Set(data.nodes.map(function (n) { return n.position; }));
  var spans = [];
  data.tokens.forEach(function (token, pos) {
    var text = visible(token), short = shorten(text, 24);
    var span = box.append("span")
      .attr("class", "ratlens-tok" + (onTrace.has(pos) ? " on-trace" : "") +
        (pos === data.meta.target_pos ? " is-target" : ""))
      .attr("data-pos", pos)
      .attr("title", short === text ? null : text)
      .text(short);
    spans.push(span);
    if (token.indexOf("\n") >= 0) box.append("br");  // keep the text's lines
  });

  var byQuery = d3.group(data.strip.rows, function (r) { return r[0]; });
  var byKey = d3.group(data.strip.rows, function (r) { return r[1]; });

  function clear() {
    box.selectAll(".ratlens-tok").classed("is-related", false).classed("is-hover", false)
      .style("background", null);
    readout.text(hint);
  }

  function hover(pos) {
    clear();
    var rows = ((view === "to" ? byQuery : byKey).get(pos) || []).slice()
      .sort(function (a, b) { return b[2] - a[2]; });
    var other = view === "to" ? 1 : 0;
    var strongest = new Map();
    rows.forEach(function (r) {
      strongest.set(r[other], Math.max(strongest.get(r[other]) || 0, r[2]));
    });
    strongest.forEach(function (w, p) {
      spans[p].classed("is-related", true)
        .style("background", "rgba(214, 39, 40, " + (0.12 + 0.7 * w).toFixed(3) + ")");
    });
    spans[pos].classed("is-hover", true);
    var verb = view === "to" ? " attends to: " : " is attended by: ";
    var listed = rows.slice(0, STRIP_SHOWN).map(function (r) {
      return tokenAt(data, r[other], 16) + " " + fmt(r[2], 2) + " (" + edgeName(r[3], [r[4]]) + ")";
    });
    if (rows.length > STRIP_SHOWN) listed.push("\u2026 " + (rows.length - STRIP_SHOWN) + " more");
    readout.text(tokenAt(data, pos, 24) + (rows.length ? verb + listed.join(", ") :
      (view === "to" ? " attends to nothing" : " is attended by nothing") +
      (edgesOnly ? " on the traced paths" : " above the kept weights")));
  }

  box.on("mouseover", function (event) {
    var pos = event.target.getAttribute && event.target.getAttribute("data-pos");
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
