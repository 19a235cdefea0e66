// SVG line charts (no library): series of [x, y] points, drawn as a line, markers, or both.
import { h, svg } from "./ui.js";

function ticks(lo, hi, n = 5) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

export function lineChart({ series, xlabel = "step", ylabel = "", width = 640, height = 260, id, xrange }) {
  const pts = series.flatMap((s) => s.points);
  const W = width, H = height, L = 56, R = 16, T = 14, B = 38;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", id, role: "img",
                            "data-points": pts.length, "aria-label": ylabel });
  if (!pts.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no points yet"));
    return h("figure", { class: "chart-box" }, root);
  }
  let [x0, x1] = xrange || [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const pad = (y1 - y0 || Math.abs(y1) || 1) * 0.08; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const v of ticks(y0, y1)) {
    if (v < y0 || v > y1) continue;
    root.append(svg("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "gridline" }),
                svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick" }, +v.toPrecision(4)));
  }
  for (const v of ticks(x0, x1, 6)) {
    if (v < x0 || v > x1 || (x1 - x0 > 6 && !Number.isInteger(v))) continue;
    root.append(svg("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle", class: "tick" }, v));
  }
  root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
              svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "label" }, xlabel),
              svg("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle", class: "label",
                            transform: `rotate(-90 12 ${(T + H - B) / 2})` }, ylabel));
  for (const s of series) {
    if (!s.points.length) continue;
    if (s.line !== false) {
      root.append(svg("polyline", { points: s.points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
                                    fill: "none", stroke: s.color, "stroke-width": 1.8, class: "series" }));
    }
    if (s.markers) {
      for (const p of s.points) {
        root.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3.5, fill: s.color, class: "marker" },
                        svg("title", {}, `${s.name} @ ${p[0]}: ${+p[1].toPrecision(5)}`)));
      }
    }
  }
  const legend = h("figcaption", { class: "legend" }, series.filter((s) => s.points.length).map((s) =>
    h("span", {}, h("i", { style: { background: s.color } }), `${s.name} (${s.points.length})`)));
  return h("figure", { class: "chart-box" }, root, legend);
}
