// A vector's calibration as a small inline SVG: the trade-off the recommended multiplier was
// chosen on. The summary is metadata `caa.calibration`, as `caa-local calibrate` writes it
// (caa_local/eval/calibrate.py): {"metric": NAME, "curve": [{"multiplier", "metric",
// "perplexity_ratio", "passed", ...}], "guard": {"max_perplexity_ratio"}, "recommended_multiplier",
// "negative_limit"}. The behavior's values sit under the key "metric" (the metric's NAME is only
// its label); the guard's perplexity ratio goes on a log scale on the right, with its limit.
const NS = "http://www.w3.org/2000/svg";
const SKIP = new Set(["multiplier", "perplexity", "perplexity_ratio", "broken", "degenerate", "repetition", "n"]);

function svg(tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const allFinite = (curve, key) => curve.length > 0 && curve.every((p) => Number.isFinite(p[key]));

// The key holding the behavior's values: "metric", else a key named after the metric, else
// the first numeric key that is not a guard figure. Null when the summary has none.
export function metricKey(calibration) {
  const curve = calibration.curve;
  if (allFinite(curve, "metric")) return "metric";
  if (calibration.metric && allFinite(curve, calibration.metric)) return calibration.metric;
  return Object.keys(curve[0] || {}).find((k) => !SKIP.has(k) && allFinite(curve, k)) || null;
}

const short = (x) => Number(x).toPrecision(2).replace(/\.0+$|(\.\d*?)0+$/, "$1");

export function drawCalibration(figure, calibration, recommended) {
  const curve = [...calibration.curve].sort((a, b) => a.multiplier - b.multiplier);
  const key = metricKey(calibration);
  const hasRatio = allFinite(curve, "perplexity_ratio");
  if (!key && !hasRatio) return;
  const label = calibration.metric || key || "metric";
  const limit = calibration.guard?.max_perplexity_ratio;
  const W = 240, H = 104, L = 30, R = 28, T = 8, B = 18;
  const xs = curve.map((p) => p.multiplier);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": `${label} and perplexity ratio against multiplier` });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  root.append(svg("text", { x: L, y: H - 5 }, String(x0)));
  root.append(svg("text", { x: W - R, y: H - 5, "text-anchor": "end" }, String(x1)));

  if (key) {  // the behavior, left axis, solid
    const ys = curve.map((p) => p[key]);
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y0 === y1) { y0 -= 1; y1 += 1; }
    const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
    root.append(svg("text", { x: L - 3, y: T + 6, "text-anchor": "end" }, short(y1)));
    root.append(svg("text", { x: L - 3, y: H - B, "text-anchor": "end" }, short(y0)));
    root.append(svg("polyline", { class: "curve metric", points: curve.map((p) => `${sx(p.multiplier)},${sy(p[key])}`).join(" ") }));
    for (const p of curve) {
      root.append(svg("circle", { cx: sx(p.multiplier), cy: sy(p[key]), r: 2, class: "pt metric-pt",
        "data-multiplier": p.multiplier, "data-value": p[key] }));
    }
  }
  if (hasRatio) {  // the guard's perplexity ratio, right axis (log), dashed; failed points hollow red
    const rs = curve.map((p) => p.perplexity_ratio);
    const r0 = Math.min(1, ...rs);
    const r1 = Math.max(...rs, Number.isFinite(limit) ? limit * 1.25 : 0, r0 * 2);
    const sr = (r) => T + (1 - Math.log(r / r0) / Math.log(r1 / r0)) * (H - T - B);
    root.append(svg("line", { x1: W - R, y1: T, x2: W - R, y2: H - B, class: "axis" }));
    root.append(svg("text", { x: W - R + 3, y: T + 6 }, `×${short(r1)}`));
    root.append(svg("text", { x: W - R + 3, y: H - B }, `×${short(r0)}`));
    root.append(svg("polyline", { class: "ratio", fill: "none", stroke: "#777", "stroke-dasharray": "3 2",
      points: curve.map((p) => `${sx(p.multiplier)},${sr(p.perplexity_ratio)}`).join(" ") }));
    for (const p of curve) {
      const failed = p.passed === false;
      root.append(svg("circle", { cx: sx(p.multiplier), cy: sr(p.perplexity_ratio), r: 2,
        class: "ratio-pt" + (failed ? " fail" : ""), fill: failed ? "#fff" : "#777", stroke: failed ? "#b3261e" : "#777",
        "data-multiplier": p.multiplier, "data-ratio": p.perplexity_ratio }));
    }
    if (Number.isFinite(limit) && limit > r0) {
      const y = sr(limit);
      root.append(svg("line", { x1: L, y1: y, x2: W - R, y2: y, class: "limit", stroke: "#b3261e",
        "stroke-dasharray": "1 2", "data-limit": limit }));
      root.append(svg("text", { x: W - R + 3, y: y + 3, fill: "#b3261e" }, `×${short(limit)}`));
    }
  }
  const marks = [[calibration.recommended_multiplier ?? calibration.recommended ?? recommended, "rec"],
    [calibration.negative_limit, "neg"]];
  for (const [mark, name] of marks) {
    if (!Number.isFinite(mark) || mark < x0 || mark > x1) continue;
    root.append(svg("line", { x1: sx(mark), y1: T, x2: sx(mark), y2: H - B, class: "rec", "data-mark": name }));
    const right = sx(mark) > W / 2;  // label on the side with room, clear of the right axis' labels
    root.append(svg("text", { x: sx(mark) + (right ? -2 : 2), y: T + 6, class: "rec-label",
      "text-anchor": right ? "end" : "start" }, `${name} ${mark}`));
  }
  const caption = document.createElement("figcaption");
  caption.textContent = `${key ? label : "perplexity ratio"} vs multiplier` + (key && hasRatio
    ? ` (solid, left); perplexity ratio (dashed, right${Number.isFinite(limit) ? `, guard limit ×${limit}` : ""})` : "");
  figure.append(root, caption);
}
