// The pictures, drawn by hand: a heatmap on a canvas, the rest as inline SVG.
// No library: every figure is a few shapes, and nothing may load from elsewhere.

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}, text = null) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== null) el.textContent = text;
  return el;
}

function clear(node) {
  while (node.firstChild) node.firstChild.remove();
}

// Similarity in [-1, 1] -> colour: dark blue (-1) through near-black (0) to yellow (1), so a
// recovered copy's diagonal stands out against the background.
function colour(v) {
  const t = Math.max(-1, Math.min(1, v));
  if (t >= 0) return [Math.round(20 + 235 * t), Math.round(20 + 200 * t), Math.round(30 + 10 * t)];
  return [20, Math.round(20 + 60 * -t), Math.round(30 + 180 * -t)];
}

// One pixel per cell; CSS scales the canvas up without smoothing.
export function heatmap(canvas, matrix) {
  const n = matrix.length;
  const m = n ? matrix[0].length : 0;
  canvas.width = Math.max(1, m);
  canvas.height = Math.max(1, n);
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < m; j++) {
      const [r, g, b] = colour(matrix[i][j] ?? 0);
      const o = 4 * (i * m + j);
      img.data[o] = r;
      img.data[o + 1] = g;
      img.data[o + 2] = b;
      img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}

const W = 420;
const H = 180;
const PAD = { left: 44, right: 10, top: 10, bottom: 30 };

function axes(svg, xLabel, yLabel) {
  svg.append(svgEl("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }));
  svg.append(svgEl("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }));
  svg.append(svgEl("text", { x: (W + PAD.left) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, xLabel));
  svg.append(svgEl("text", { x: 12, y: (H - PAD.bottom + PAD.top) / 2, "text-anchor": "middle", class: "label",
    transform: `rotate(-90 12 ${(H - PAD.bottom + PAD.top) / 2})` }, yLabel));
}

// Histogram of margins: bars on shared bin edges, the zero line marked.
export function histogram(svg, edges, counts, { highlight = null } = {}) {
  clear(svg);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  axes(svg, "margin (matched similarity minus best alternative)", "neurons");
  const lo = edges[0];
  const hi = edges[edges.length - 1];
  const x = (v) => PAD.left + ((v - lo) / (hi - lo || 1)) * (W - PAD.left - PAD.right);
  const top = Math.max(1, ...counts, ...(highlight || [0]));
  const y = (c) => H - PAD.bottom - (c / top) * (H - PAD.top - PAD.bottom);
  counts.forEach((c, k) => {
    if (!c) return;
    svg.append(svgEl("rect", { x: x(edges[k]) + 0.5, y: y(c), width: Math.max(1, x(edges[k + 1]) - x(edges[k]) - 1),
      height: y(0) - y(c), class: "bar" }));
  });
  (highlight || []).forEach((c, k) => {
    if (!c) return;
    svg.append(svgEl("rect", { x: x(edges[k]) + 0.5, y: y(c), width: Math.max(1, x(edges[k + 1]) - x(edges[k]) - 1),
      height: y(0) - y(c), class: "bar chosen" }));
  });
  if (lo < 0 && hi > 0) svg.append(svgEl("line", { x1: x(0), y1: PAD.top, x2: x(0), y2: H - PAD.bottom, class: "zero-line" }));
  svg.append(svgEl("text", { x: PAD.left, y: H - PAD.bottom + 12, class: "tick" }, lo.toFixed(2)));
  svg.append(svgEl("text", { x: W - PAD.right, y: H - PAD.bottom + 12, "text-anchor": "end", class: "tick" }, hi.toFixed(2)));
  svg.append(svgEl("text", { x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end", class: "tick" }, String(top)));
}

// Integrity per unit: a bar per group or layer, its flagged neurons in red.
export function integrityBars(svg, units) {
  clear(svg);
  const rowH = 18;
  const labelW = 150;
  const barW = 250;
  const height = Math.max(1, units.length) * rowH + 8;
  svg.setAttribute("viewBox", `0 0 ${labelW + barW + 60} ${height}`);
  units.forEach((u, i) => {
    const y0 = 4 + i * rowH;
    const frac = u.neurons ? u.flagged / u.neurons : 0;
    svg.append(svgEl("text", { x: labelW - 6, y: y0 + 12, "text-anchor": "end", class: "tick" }, u.name));
    svg.append(svgEl("rect", { x: labelW, y: y0 + 2, width: barW, height: rowH - 6, class: "intact" }));
    if (u.flagged) {
      svg.append(svgEl("rect", { x: labelW, y: y0 + 2, width: Math.max(2, barW * frac), height: rowH - 6, class: "flagged" }));
    }
    svg.append(svgEl("text", { x: labelW + barW + 6, y: y0 + 12, class: "tick" }, `${u.flagged}/${u.neurons}`));
  });
}

// Watermark bits: the key's, then those read before and after re-synchronization; a bit that
// differs from the key is drawn hollow and red.
export function bitStrips(svg, wm) {
  clear(svg);
  const rows = [["key", wm.key], ["before", wm.before], ["after", wm.after]];
  const n = wm.key.length;
  const cell = Math.max(3, Math.min(12, Math.floor(600 / Math.max(1, n))));
  const labelW = 56;
  svg.setAttribute("viewBox", `0 0 ${labelW + n * cell + 4} ${rows.length * (cell + 8) + 4}`);
  rows.forEach(([name, bits], r) => {
    const y0 = 4 + r * (cell + 8);
    svg.append(svgEl("text", { x: labelW - 6, y: y0 + cell - 1, "text-anchor": "end", class: "tick" }, name));
    for (let j = 0; j < n; j++) {
      const wrong = bits[j] !== wm.key[j];
      const cls = wrong ? "bit wrong" : bits[j] === "1" ? "bit one" : "bit zero";
      svg.append(svgEl("rect", { x: labelW + j * cell, y: y0, width: cell - 1, height: cell, class: cls }));
    }
  });
}
