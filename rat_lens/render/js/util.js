// util.js: helpers shared by the widget's parts (the contract of these headers: schema.js).
// Token text only ever reaches the page through textContent (d3's .text()), never as markup.
// Defines: WHITESPACE, visible, shorten, fmt, beamColor, layerName, headsText, edgeName, isolate,
//   tokenAt, infoRow.
// Uses: nothing.

// Whitespace made visible, so that " dog", "dog" and "dog\n" look different.
const WHITESPACE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d",
                    "\u2028": "\u2424", "\u2029": "\u00b6"};

function visible(token) {
  if (token === "") return "\u2205";
  return Array.from(token, function (c) { return WHITESPACE[c] || c; }).join("");
}

// Cut by code points, so an emoji or a surrogate pair is never split in half.
function shorten(text, max) {
  const chars = Array.from(text);
  return chars.length <= max ? text : chars.slice(0, max - 1).join("") + "\u2026";
}

function fmt(x, digits) {
  return Number(x).toFixed(digits === undefined ? 3 : digits);
}

// Tableau10 as long as it lasts, then evenly spaced hues: beams stay distinguishable.
function beamColor(i, n) {
  return n <= 10 ? d3.schemeTableau10[i] : d3.interpolateSinebow(i / n);
}

// In layers mode a path ends on the residual stream below its last layer: below layer 0 that is
// the embeddings.
function layerName(layer) {
  return layer < 0 ? "emb" : "L" + layer;
}

function headsText(heads) {
  const named = heads.filter(function (h) { return h !== null; });
  return named.length ? "H" + named.join(",H") : "";
}

function edgeName(layer, heads) {
  if (layer === null) return "traced layers";  // token-strip rows averaged over layers and heads
  const h = headsText(heads);
  return layerName(layer) + (h ? " " + h : "");
}

// Unicode isolates around token text, so a right-to-left token cannot reorder the text around
// it (its position number, the next token) in plain-text places: SVG labels, tooltips, readouts.
function isolate(text) {
  return "\u2068" + text + "\u2069";
}

// "dog"@5 as it appears everywhere: visible whitespace, position after. `data` is the Payload
// (schema.js), as in every file after this one.
function tokenAt(data, pos, max) {
  const text = visible(data.tokens[pos] === undefined ? "?" : data.tokens[pos]);
  return "\u201c" + isolate(max ? shorten(text, max) : text) + "\u201d@" + pos;
}

// Build <div class="ratlens-row"><span>label</span><span>value</span></div> with text only.
function infoRow(parent, label, value, valueClass) {
  const row = parent.append("div").attr("class", "ratlens-row");
  row.append("span").text(label);
  row.append("span").attr("class", valueClass || null).text(value);
  return row;
}
