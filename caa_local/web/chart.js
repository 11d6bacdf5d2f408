// A vector's calibration curve as a small inline SVG: its metric against the multiplier,
// with the recommended multiplier marked. The summary is metadata `caa.calibration`:
// {"curve": [{"multiplier": m, <metric>: y, ...}, ...], "metric"?: name, "recommended"?: m}.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function metricName(calibration) {
  if (calibration.metric && calibration.curve.every((p) => Number.isFinite(p[calibration.metric]))) {
    return calibration.metric;
  }
  const first = calibration.curve[0] || {};
  return Object.keys(first).find((k) => k !== "multiplier" && calibration.curve.every((p) => Number.isFinite(p[k])));
}

export function drawCalibration(figure, calibration, recommended) {
  const metric = metricName(calibration);
  if (!metric) return;
  const points = calibration.curve.map((p) => [p.multiplier, p[metric]]).sort((a, b) => a[0] - b[0]);
  const W = 220, H = 90, L = 30, R = 6, T = 6, B = 18;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": `${metric} against multiplier` });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  root.append(svg("text", { x: L - 3, y: T + 8, "text-anchor": "end" }, y1.toPrecision(2)));
  root.append(svg("text", { x: L - 3, y: H - B, "text-anchor": "end" }, y0.toPrecision(2)));
  root.append(svg("text", { x: L, y: H - 4 }, String(x0)));
  root.append(svg("text", { x: W - R, y: H - 4, "text-anchor": "end" }, String(x1)));
  root.append(svg("polyline", { points: points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), class: "curve" }));
  for (const [x, y] of points) root.append(svg("circle", { cx: sx(x), cy: sy(y), r: 2, class: "pt" }));
  const mark = calibration.recommended ?? calibration.recommended_multiplier ?? recommended;
  if (Number.isFinite(mark) && mark >= x0 && mark <= x1) {
    root.append(svg("line", { x1: sx(mark), y1: T, x2: sx(mark), y2: H - B, class: "rec" }));
    root.append(svg("text", { x: sx(mark) + 2, y: T + 8, class: "rec-label" }, `rec ${mark}`));
  }
  const caption = document.createElement("figcaption");
  caption.textContent = `${metric} vs multiplier`;
  figure.append(root, caption);
}
