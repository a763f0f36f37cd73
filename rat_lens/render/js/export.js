// export.js: export the diagram as a standalone SVG or PNG file: the whole diagram (not the
// zoomed view), with highlights and the beam filter as they are on screen, under a title and
// above its key (the colours shown and what width, direction and score mean).
// Defines: EXPORT_STYLE, SVG_NS, EXPORT_FONT, svgText, wrapText, svgMarkup, download, exportSvg,
//   exportPng.
// Uses: nothing.

// Styles come from our CSS classes; the exported file has no stylesheet, so each element gets
// its computed values inline.
const EXPORT_STYLE = ["fill", "fill-opacity", "stroke", "stroke-opacity", "stroke-width",
                      "opacity", "display", "font-family", "font-size", "font-weight",
                      "paint-order"];
const SVG_NS = "http://www.w3.org/2000/svg";
const EXPORT_FONT = "-apple-system, 'Segoe UI', Roboto, Ubuntu, sans-serif";

function svgText(parent, x, y, text, size, weight) {
  const t = document.createElementNS(SVG_NS, "text");
  t.setAttribute("x", x);
  t.setAttribute("y", y);
  t.setAttribute("style", "font-family:" + EXPORT_FONT + ";font-size:" + size + "px;" +
    "font-weight:" + (weight || 400) + ";fill:#1f2430");
  t.textContent = text;
  parent.appendChild(t);
  return t;
}

// Lines of at most `chars` characters, broken at spaces (SVG text does not wrap).
function wrapText(text, chars) {
  const lines = [];
  let line = "";
  text.split(" ").forEach(function (word) {
    if (line && (line + " " + word).length > chars) {
      lines.push(line);
      line = word;
    } else {
      line = line ? line + " " + word : word;
    }
  });
  if (line) lines.push(line);
  return lines;
}

// extra: {title, swatches: [{color, text}], notes: [string]}: what goes above and below.
function svgMarkup(view, extra) {
  const source = view.svg.node(), clone = source.cloneNode(true);
  const from = source.querySelectorAll("*"), to = clone.querySelectorAll("*");
  for (let i = 0; i < from.length; i++) {
    const computed = getComputedStyle(from[i]);
    to[i].setAttribute("style", EXPORT_STYLE.map(function (p) {
      return p + ":" + computed.getPropertyValue(p);
    }).join(";"));
  }
  const width = Math.max(Math.ceil(view.width + 16), 640);
  const chars = Math.floor((width - 16) / 6.4);
  const titleLines = wrapText(extra.title, Math.floor((width - 16) / 8));
  const top = 10 + 20 * titleLines.length;
  const legend = document.createElementNS(SVG_NS, "g");
  legend.setAttribute("class", "ratlens-export-key");
  let y = top + Math.ceil(view.height) + 16, x = 8;
  extra.swatches.forEach(function (s) {
    const w = 22 + 6.6 * s.text.length;
    if (x + w > width - 8) { x = 8; y += 18; }
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("x", x);
    rect.setAttribute("y", y - 10);
    rect.setAttribute("width", 12);
    rect.setAttribute("height", 12);
    rect.setAttribute("style", "fill:" + s.color);
    legend.appendChild(rect);
    svgText(legend, x + 16, y, s.text, 11);
    x += w + 10;
  });
  if (extra.swatches.length) y += 22;
  extra.notes.forEach(function (note) {
    wrapText(note, chars).forEach(function (line) {
      svgText(legend, 8, y, line, 11);
      y += 15;
    });
  });
  const height = y + 4;
  clone.querySelector(".ratlens-viewport").setAttribute("transform", "translate(8," + top + ")");
  clone.setAttribute("xmlns", SVG_NS);
  clone.setAttribute("width", width);
  clone.setAttribute("height", height);
  clone.setAttribute("viewBox", "0 0 " + width + " " + height);
  const background = document.createElementNS(SVG_NS, "rect");
  background.setAttribute("width", "100%");
  background.setAttribute("height", "100%");
  background.setAttribute("fill", "#fff");
  clone.insertBefore(background, clone.firstChild);
  const title = document.createElementNS(SVG_NS, "g");
  title.setAttribute("class", "ratlens-export-title");
  titleLines.forEach(function (line, i) { svgText(title, 8, 22 + 20 * i, line, 14, 600); });
  clone.insertBefore(title, background.nextSibling);
  clone.appendChild(legend);
  return {markup: new XMLSerializer().serializeToString(clone), width: width, height: height};
}

function download(ui, name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.style.display = "none";
  ui.root.node().appendChild(a);
  a.click();
  a.remove();
  setTimeout(function () { URL.revokeObjectURL(a.href); }, 60000);
}

function exportSvg(ui, view, name, extra) {
  download(ui, name + ".svg", new Blob([svgMarkup(view, extra).markup],
                                       {type: "image/svg+xml"}));
}

// Drawn through an Image element holding the SVG onto a canvas, at 2x (less for huge diagrams:
// browsers cap canvas sides near 16k pixels).
function exportPng(ui, view, name, extra) {
  const svg = svgMarkup(view, extra), image = new Image();
  const scale = Math.min(2, 8000 / Math.max(svg.width, svg.height));
  image.onload = function () {
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(svg.width * scale);
    canvas.height = Math.round(svg.height * scale);
    const context = canvas.getContext("2d");
    context.scale(scale, scale);
    context.drawImage(image, 0, 0, svg.width, svg.height);
    canvas.toBlob(function (blob) { download(ui, name + ".png", blob); }, "image/png");
  };
  image.onerror = function () { console.error("rat_lens: the PNG export could not draw the SVG"); };
  image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svg.markup);
}
