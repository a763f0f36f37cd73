// census.js: the census page (rat_lens/render/_census.py): a layer x head heatmap of a census,
// coloured by one of its counts (a toggle), tooltips, and the prompts it traced, filtered by a
// clicked head. Its data is a CensusPayload (schema.js); the page loads the trace page's files
// (_html.py's SCRIPTS), then this one. Text reaches the page through textContent only.
// Each listed prompt has an expander that draws its trace with the trace page's own code (mount).
// Defines: CENSUS_METRICS, censusRoles, censusToken, censusLines, drawCensusGrid, censusKeys,
//   drawCensusRoute, drawCensusTraces, drawCensusPrompts, censusCheck, mountCensus.
// Uses: util.js: WHITESPACE, fmt, prob, headColor, headName, headKey, visible, shorten, isolate;
//   mount.js: mount.

// What the heatmap can be coloured by: a CensusHead field each.
const CENSUS_METRICS = [
  {key: "top_beam_prompts", label: "top-beam prompts",
   meaning: "prompts whose best beam has an edge through the head"},
  {key: "traced_mass", label: "traced mass",
   meaning: "the Sankey weight of its edges summed over all prompts: softmax(score) over a " +
     "prompt's beams \u00d7 edge weight"},
  {key: "edges", label: "beam edges", meaning: "edges through the head, all beams of all prompts"},
];

// {role name: score} of a (layer, head) from the census's role scores, or null.
function censusRoles(data, layer, head) {
  const roles = data.roles;
  const row = roles ? roles.layers.indexOf(layer) : -1;
  if (row < 0 || head === null) return null;
  const found = {};
  Object.keys(roles.scores).forEach(function (name) {
    const value = roles.scores[name][row][head];
    if (value !== undefined) found[name] = value;
  });
  return Object.keys(found).length ? found : null;
}

// A token of a listed prompt: spaces as they are, other whitespace made visible (one line each).
function censusToken(token) {
  return Array.from(token, function (c) { return c === " " ? c : WHITESPACE[c] || c; }).join("");
}

// A cell's tooltip and accessible name: the head, its counts, its roles.
function censusLines(data, cell) {
  const n = data.meta.n_prompts, c = cell.count;
  const lines = [cell.name];
  if (!c) {
    lines.push("on no traced route");
  } else {
    lines.push("best beam of " + c.top_beam_prompts + " of " + n + " prompts (" +
      fmt(100 * c.top_beam_prompts / Math.max(n, 1), 1) + "%)");
    lines.push("beam edges: " + c.edges);
    lines.push("traced mass: " + fmt(c.traced_mass) + " (" + fmt(100 * c.mass_share, 1) +
      "% of all)");
  }
  if (cell.roles) {
    lines.push("roles: " + Object.keys(cell.roles).map(function (name) {
      return name.replace(/_head$/, "").replace(/_/g, " ") + " " + fmt(cell.roles[name]);
    }).join(", "));
  }
  return lines;
}

// The heatmap: one SVG rect per (layer, head), rows top layer first. Returns the cells' d3
// selection and a function recolouring them by a metric.
function drawCensusGrid(box, data, opts) {
  const m = data.meta, heads = m.heads, layers = m.layers;
  const byKey = new Map(data.heads.map(function (h) { return [headKey(h.layer, h.head), h]; }));
  const cells = [];
  layers.forEach(function (layer, row) {
    heads.forEach(function (head, col) {
      cells.push({layer: layer, head: head, row: row, col: col, key: headKey(layer, head),
                  name: headName(layer, head), count: byKey.get(headKey(layer, head)) || null,
                  roles: censusRoles(data, layer, head)});
    });
  });
  const w = Math.max(16, Math.min(48, Math.floor(720 / heads.length)));
  const h = Math.max(12, Math.min(30, Math.floor(560 / layers.length)));
  const left = 44, top = 22, numbers = w >= 34 && h >= 18;
  const svg = box.append("svg").attr("class", "ratlens-census-svg")
    .attr("width", left + w * heads.length + 2).attr("height", top + h * layers.length + 2)
    .attr("role", "group")
    .attr("aria-label", "layer by head heatmap of the census; each cell is a button");
  svg.selectAll("text.ratlens-census-col").data(heads).join("text")
    .attr("class", "ratlens-census-col")
    .attr("x", function (d, i) { return left + w * i + w / 2; }).attr("y", top - 7)
    .attr("text-anchor", "middle")
    .text(function (d) { return d === null ? "all heads" : heads.length > 24 ? d : "H" + d; });
  svg.selectAll("text.ratlens-census-row").data(layers).join("text")
    .attr("class", "ratlens-census-row")
    .attr("x", left - 6).attr("y", function (d, i) { return top + h * i + h / 2; })
    .attr("dy", "0.35em").attr("text-anchor", "end")
    .text(function (d) { return "L" + d; });
  const g = svg.selectAll("g.ratlens-census-cell").data(cells).join("g")
    .attr("class", "ratlens-census-cell")
    .attr("transform", function (c) {
      return "translate(" + (left + w * c.col) + "," + (top + h * c.row) + ")";
    })
    .attr("tabindex", -1).attr("role", "button")
    .attr("data-layer", function (c) { return c.layer; })
    .attr("data-head", function (c) { return c.head === null ? null : c.head; })
    .attr("data-top-beam-prompts", function (c) { return c.count ? c.count.top_beam_prompts : 0; })
    .attr("data-edges", function (c) { return c.count ? c.count.edges : 0; })
    .attr("data-traced-mass", function (c) { return c.count ? c.count.traced_mass : 0; })
    .attr("aria-label", function (c) { return censusLines(data, c).join("; "); })
    .on("mousemove", function (event, c) { opts.hover(event, censusLines(data, c).join("\n")); })
    .on("mouseleave", opts.leave)
    .on("click", function (event, c) { opts.pick(c); })
    .on("keydown", function (event, c) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        opts.pick(c);
      }
    });
  g.append("rect").attr("width", w - 1).attr("height", h - 1).attr("rx", 2);
  censusKeys(g, heads.length);
  const label = g.append("text").attr("x", (w - 1) / 2).attr("y", (h - 1) / 2)
    .attr("dy", "0.35em").attr("text-anchor", "middle");

  function colour(metric) {
    const value = function (c) { return c.count ? c.count[metric.key] : 0; };
    const top = d3.max(cells, value) || 1;
    const scale = d3.scaleSequential(d3.interpolateBlues).domain([0, top]);
    g.attr("data-value", value);
    g.select("rect")
      .style("fill", function (c) { return value(c) > 0 ? scale(value(c)) : "#f4f5f8"; });
    label.style("fill", function (c) { return value(c) / top > 0.55 ? "#fff" : "#1f2430"; })
      .text(function (c) {
        if (!numbers || !value(c)) return "";
        return metric.key === "traced_mass" ? fmt(value(c), value(c) >= 10 ? 1 : 2)
          : String(value(c));
      });
    return {top: top, scale: scale};
  }
  return {cells: g, colour: colour};
}

// The heatmap is one Tab stop (a roving tabindex): arrow keys move between cells.
function censusKeys(g, width) {
  const all = g.nodes();
  if (!all.length) return;
  let at = 0;
  all[0].setAttribute("tabindex", 0);
  g.on("focus", function () {
    all[at].setAttribute("tabindex", -1);
    at = all.indexOf(this);
    this.setAttribute("tabindex", 0);
  }).on("keydown.move", function (event) {
    const step = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: width, ArrowUp: -width}[event.key];
    if (step === undefined) return;
    event.preventDefault();
    all[Math.max(0, Math.min(all.length - 1, at + step))].focus();
  });
}

// A prompt's best route from the target back, moves only: "L18.H6 → “w0”@20 · L2.H1 → …",
// each head in its colour (the trace page's), and the model's prediction at the target.
function drawCensusRoute(items) {
  const route = items.append("div").attr("class", "ratlens-census-route");
  route.filter(function (p) { return p.guess !== null; }).append("span")
    .attr("class", "ratlens-census-guess").text(function (p) {
      return "predicts \u201c" + isolate(visible(p.guess)) + "\u201d " + prob(p.guess_prob);
    });
  route.filter(function (p) { return !p.moves.length; }).append("span")
    .text(function (p) { return p.path ? "no move: the route stays at the target" : "no beam"; });
  const move = route.selectAll("span.ratlens-census-move")
    .data(function (p) { return p.moves; }).join("span").attr("class", "ratlens-census-move")
    .attr("title", function (m) {
      return headName(m.layer, m.head) + ": position " + m.query + " reads " + m.key +
        ", weight " + fmt(m.weight);
    });
  move.append("span").attr("class", "ratlens-swatch").style("background", function (m) {
    return m.head === null ? null : headColor(m.layer, m.head);
  });
  move.append("b").text(function (m) { return headName(m.layer, m.head); });
  move.append("span").text(function (m) {
    return " \u2192 \u201c" + isolate(shorten(visible(m.token), 16)) + "\u201d@" + m.key;
  });
}

// Each prompt's expander: its trace (CensusPrompt.trace, a Payload), drawn by the trace page's
// mount when it first opens (a thousand widgets drawn up front would take seconds). While one is
// open the list spans the page's width below the heatmap (`main` gets is-tracing): the trace
// needs the room its own page has. Its element id is the prompt's, so a redrawn list reuses it.
function drawCensusTraces(items, main, uid) {
  const more = items.filter(function (p) { return p.trace; }).append("details")
    .attr("class", "ratlens-census-trace");
  more.append("summary").text(function (p) {
    return "Trace of #" + p.index + ": route map, Sankey, beams, heads";
  });
  more.on("toggle", function (event, p) {
    main.classed("is-tracing", !main.select(".ratlens-census-trace[open]").empty());
    if (!this.open) return;
    this.scrollIntoView({block: "start"});
    if (this.querySelector(".ratlens")) return;
    const root = d3.select(this).append("div").attr("class", "ratlens")
      .attr("id", "ratlens-census-" + uid + "-" + p.index);
    try {
      mount(root, p.trace, {});
    } catch (err) {
      root.append("div").attr("class", "ratlens-error")
        .text("rat_lens could not draw this trace: " + err);
      console.error(err);
    }
  });
}

// The listed prompts (CensusPrompt), or those whose best beam goes through `cell`'s head.
function drawCensusPrompts(box, data, cell, uid) {
  const m = data.meta;
  box.selectAll("*").remove();
  const through = function (p) {
    return p.layers.some(function (l, i) { return headKey(l, p.heads[i]) === cell.key; });
  };
  const shown = cell ? data.prompts.filter(through) : data.prompts;
  box.append("h4").text(cell ? "Prompts whose best beam goes through " + cell.name : "Prompts");
  const listed = m.listed < m.n_prompts ? "the first " + m.listed + " of the " + m.n_prompts +
    " prompts" : "all " + m.n_prompts + " prompts";
  box.append("div").attr("class", "ratlens-note").text(cell
    ? shown.length + " of " + listed + " listed here (the census counts " +
      (cell.count ? cell.count.top_beam_prompts : 0) + " of " + m.n_prompts + "). Click the " +
      "cell again for every prompt."
    : "The page lists " + listed + ": each one's text up to the traced token (outlined), and " +
      "its best beam; open a prompt's trace for its route map. Click a cell of the heatmap for " +
      "the prompts whose best beam uses that head." + (m.with_trace < m.listed ? " The page " +
      "holds the traces of the first " + m.with_trace + " prompts only (its size budget); " +
      "draw any other with rat_lens.render.render_html(found.traces()[i], ...)." : ""));
  const items = box.append("ol").attr("class", "ratlens-census-prompts")
    .selectAll("li").data(shown).join("li")
    .attr("data-index", function (p) { return p.index; });
  items.append("span").attr("class", "ratlens-census-index")
    .text(function (p) { return "#" + p.index; });
  const text = items.append("span").attr("class", "ratlens-census-text");
  text.filter(function (p) { return p.start > 0; }).append("span").text("\u2026");
  text.selectAll("span.ratlens-census-tok").data(function (p) { return p.before; }).join("span")
    .attr("class", "ratlens-census-tok").text(censusToken);
  text.append("mark").attr("class", "ratlens-census-target")
    .attr("title", function (p) { return "traced token, position " + p.target_pos; })
    .text(function (p) { return visible(p.target); });
  text.selectAll("span.ratlens-census-after").data(function (p) { return p.after; }).join("span")
    .attr("class", "ratlens-census-tok ratlens-census-after").text(censusToken);
  text.filter(function (p) { return p.target_pos + 1 + p.after.length < p.seq_len; })
    .append("span").attr("class", "ratlens-census-after").text("\u2026");
  drawCensusRoute(items);
  items.filter(function (p) { return p.verification && p.verification.beams.length; })
    .append("div").attr("class", "ratlens-note ratlens-census-check")
    .text(function (p) { return censusCheck(p.verification); });
  drawCensusTraces(items, d3.select(box.node().parentNode), uid);
}

// The best beam's causal effect, as the census's check (verify) measured it.
function censusCheck(v) {
  const b = v.beams[0];
  const against = [b.ratio === null ? null : fmt(b.ratio, 1) + "\u00d7 random paths of its shape",
    b.p_value === null ? null : "p = " + fmt(b.p_value, 3)].filter(function (x) { return x; });
  return "ablating the best beam (" + v.ablation + "): " + v.metric_name + " drops by " +
    fmt(b.effect) +
    (against.length ? " (" + against.join(", ") + ")" : "");
}

function mountCensus(uid) {
  const root = d3.select(document.getElementById("ratlens-census-" + uid));
  try {
    const data = JSON.parse(document.getElementById("ratlens-census-data-" + uid).textContent);
    const m = data.meta, o = m.options;
    const header = root.append("div").attr("class", "ratlens-header");
    header.append("div").attr("class", "ratlens-title")
      .text("Census of " + m.n_prompts + " prompts: " + m.traced_layers +
        (o.agg_heads === "none" ? ", per head" : o.agg_heads ? ", heads " + o.agg_heads : ""));
    const controls = header.append("div").attr("class", "ratlens-controls")
      .attr("role", "radiogroup").attr("aria-label", "colour the heatmap by");
    controls.append("span").text("Colour by:");
    const metrics = CENSUS_METRICS.map(function (metric) {
      return Object.assign({}, metric, metric.key === "traced_mass" && o.edge_weight &&
        o.edge_weight !== "attention" ? {label: "traced contribution"} : {});
    });
    const buttons = controls.selectAll("label").data(metrics).join("label")
      .attr("class", "ratlens-census-metric");
    buttons.append("input").attr("type", "radio").attr("name", "ratlens-census-metric-" + uid)
      .attr("value", function (d) { return d.key; })
      .property("checked", function (d, i) { return i === 0; })
      .on("change", function (event, d) { show(d); });
    buttons.append("span").text(function (d) { return d.label; });
    root.append("div").attr("class", "ratlens-note").text(Object.keys(o)
      .filter(function (k) { return k !== "agg_heads" && o[k] !== null; })
      .map(function (k) { return k + " " + o[k]; }).join(", "));
    const main = root.append("div").attr("class", "ratlens-census-main");
    const gridBox = main.append("div").attr("class", "ratlens-box ratlens-census-grid");
    const tooltip = root.append("div").attr("class", "ratlens-tooltip").style("display", "none");
    let picked = null;
    const grid = drawCensusGrid(gridBox, data, {
      hover: function (event, text) {
        const at = root.node().getBoundingClientRect();
        tooltip.style("display", null).text(text)
          .style("left", (event.clientX - at.left + 14) + "px")
          .style("top", (event.clientY - at.top + 14) + "px");
      },
      leave: function () { tooltip.style("display", "none"); },
      pick: function (cell) {
        picked = picked && picked.key === cell.key ? null : cell;
        const on = function (c) { return picked !== null && c.key === picked.key; };
        grid.cells.classed("is-on", on).attr("aria-pressed", on);
        drawCensusPrompts(promptBox, data, picked, uid);
      },
    });
    const key = gridBox.append("div").attr("class", "ratlens-census-key");
    const promptBox = main.append("div").attr("class", "ratlens-box ratlens-census-list");
    function show(metric) {
      const ramp = grid.colour(metric);
      key.selectAll("*").remove();
      key.attr("data-metric", metric.key);
      key.append("span").text("0");
      key.append("span").attr("class", "ratlens-census-ramp")
        .style("background", "linear-gradient(to right, " +
          d3.range(0, 1.01, 0.25).map(function (t) { return ramp.scale(t * ramp.top); })
            .join(", ") + ")");
      key.append("span").text(metric.key === "traced_mass" ? fmt(ramp.top) : String(ramp.top));
      key.append("div").attr("class", "ratlens-note")
        .text(metric.label + ": " + metric.meaning + ". Hover a cell for all its numbers" +
          (data.roles ? " and role scores" : "") + "; click it for its prompts.");
    }
    show(metrics[0]);
    drawCensusPrompts(promptBox, data, null, uid);
    root.attr("data-ratlens-ready", "1");
  } catch (err) {
    root.append("div").attr("class", "ratlens-error")
      .text("rat_lens could not draw this census: " + err);
    console.error(err);
  }
}
