// export.js: export the diagram as a standalone SVG or PNG file: the whole diagram (not the
// zoomed view), with highlights and the beam filter as they are on screen.
// Defines: EXPORT_STYLE, SVG_NS, svgMarkup, download, exportSvg, exportPng.
// Uses: nothing.

// Styles come from our CSS classes; the exported file has no stylesheet, so each element gets
// its computed values inline.
const EXPORT_STYLE = ["fill", "fill-opacity", "stroke", "stroke-opacity", "stroke-width",
                      "opacity", "display", "font-family", "font-size", "font-weight",
                      "paint-order"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svgMarkup(view) {
  const source = view.svg.node(), clone = source.cloneNode(true);
  const from = source.querySelectorAll("*"), to = clone.querySelectorAll("*");
  for (let i = 0; i < from.length; i++) {
    const computed = getComputedStyle(from[i]);
    to[i].setAttribute("style", EXPORT_STYLE.map(function (p) {
      return p + ":" + computed.getPropertyValue(p);
    }).join(";"));
  }
  const width = Math.ceil(view.width + 16), height = Math.ceil(view.height + 8);
  clone.querySelector(".ratlens-viewport").setAttribute("transform", "translate(8,4)");
  clone.setAttribute("xmlns", SVG_NS);
  clone.setAttribute("width", width);
  clone.setAttribute("height", height);
  clone.setAttribute("viewBox", "0 0 " + width + " " + height);
  const background = document.createElementNS(SVG_NS, "rect");
  background.setAttribute("width", "100%");
  background.setAttribute("height", "100%");
  background.setAttribute("fill", "#fff");
  clone.insertBefore(background, clone.firstChild);
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

function exportSvg(ui, view, name) {
  download(ui, name + ".svg", new Blob([svgMarkup(view).markup], {type: "image/svg+xml"}));
}

// Drawn through an Image element holding the SVG onto a canvas, at 2x (less for huge diagrams:
// browsers cap canvas sides near 16k pixels).
function exportPng(ui, view, name) {
  const svg = svgMarkup(view), image = new Image();
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
