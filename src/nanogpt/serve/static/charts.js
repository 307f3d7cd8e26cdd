// Drawing: the probability colour of a token, bar charts of a distribution, the loss curve. Plain SVG built
// with DOM calls (no library): what is drawn is also kept as data on the element, for tests and screen readers.

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A token's background for probability p: from warm (unlikely) to cool (likely), by log-probability, since
// most of a small model's tokens sit between 1% and 50% and a linear scale would paint them all alike.
export function probColour(p) {
  const t = Math.max(0, Math.min(1, 1 + Math.log10(Math.max(p, 1e-3)) / 3)); // 0.1% -> 0, 100% -> 1
  const hue = 10 + t * 190; // red-orange to blue
  return `hsl(${hue.toFixed(0)} 75% ${(88 - 10 * t).toFixed(0)}%)`;
}

export function pct(p) {
  if (p >= 0.995) return "100%";
  if (p >= 0.1) return `${(100 * p).toFixed(0)}%`;
  if (p >= 0.001) return `${(100 * p).toFixed(1)}%`;
  return "<0.1%";
}

// A visible form of a token: spaces and newlines drawn, so " the" and "the" differ on screen.
export function showToken(t) {
  return t.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";
}

// Horizontal bars of [[token, p], ...] (most likely first), `chosen` highlighted, an optional "rest" bar.
export function barChart(svg, dist, { chosen = null, rest = null, rows = 12 } = {}) {
  svg.replaceChildren();
  const items = dist.slice(0, rows).map(([t, p]) => ({ t, p }));
  if (rest !== null && rest > 0.0005) items.push({ t: null, p: rest });
  const rowH = 20, labelW = 110, barW = 180, width = labelW + barW + 52;
  svg.setAttribute("viewBox", `0 0 ${width} ${items.length * rowH + 4}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", items.length * rowH + 4);
  const top = Math.max(...items.map((i) => i.p), 1e-9);
  items.forEach(({ t, p }, i) => {
    const y = i * rowH + 2;
    const g = el("g", { class: t === chosen ? "bar chosen" : t === null ? "bar rest" : "bar" });
    const label = t === null ? "(the rest)" : showToken(t);
    g.append(el("text", { x: labelW - 6, y: y + 14, "text-anchor": "end" }, label.slice(0, 16)));
    g.append(el("rect", { x: labelW, y: y + 3, width: Math.max(1, (barW * p) / top), height: rowH - 6, rx: 2 }));
    g.append(el("text", { x: labelW + (barW * p) / top + 4, y: y + 14, class: "num" }, pct(p)));
    g.append(el("title", {}, `${label}: ${(100 * p).toFixed(2)}%`));
    svg.append(g);
  });
  svg.dataset.bars = JSON.stringify(items.map(({ t, p }) => [t, p]));
}

function ticks(lo, hi, n) {
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n || 1)));
  const mult = [1, 2, 5, 10].find((m) => (hi - lo) / (step * m) <= n) || 10;
  const s = step * mult, out = [];
  for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-9; v += s) out.push(+v.toPrecision(6));
  return out;
}

// The loss curve: training loss as a line, held-out loss as dots joined by a dashed line, by step.
export function lossCurve(svg, points) {
  svg.replaceChildren();
  const W = 640, H = 320, L = 52, R = 16, T = 16, B = 40;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const train = points.filter((p) => p.loss !== null);
  const val = points.filter((p) => p.val_loss !== null);
  const ys = [...train.map((p) => p.loss), ...val.map((p) => p.val_loss)];
  const steps = points.map((p) => p.step);
  if (!ys.length) return;
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-3);
  const X = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (const v of ticks(y0, y1, 5)) {
    svg.append(el("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid" }));
    svg.append(el("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", class: "axis" }, String(v)));
  }
  for (const s of ticks(x0, x1, 6)) {
    svg.append(el("text", { x: X(s), y: H - B + 16, "text-anchor": "middle", class: "axis" }, String(s)));
  }
  svg.append(el("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "axis" }, "step"));
  svg.append(el("text", { x: 12, y: T + (H - T - B) / 2, class: "axis", transform: `rotate(-90 12 ${T + (H - T - B) / 2})`, "text-anchor": "middle" }, "loss (nats/token)"));
  const path = (pts, key) => pts.map((p, i) => `${i ? "L" : "M"}${X(p.step).toFixed(1)},${Y(p[key]).toFixed(1)}`).join("");
  if (train.length) svg.append(el("path", { d: path(train, "loss"), class: "train" }));
  if (val.length) {
    svg.append(el("path", { d: path(val, "val_loss"), class: "val" }));
    for (const p of val) {
      const dot = el("circle", { cx: X(p.step), cy: Y(p.val_loss), r: 3.5, class: "val-dot" });
      dot.append(el("title", {}, `step ${p.step}: held-out loss ${p.val_loss.toFixed(3)}`));
      svg.append(dot);
    }
  }
  const legend = el("g", { class: "legend-svg" });
  legend.append(el("line", { x1: W - 200, x2: W - 180, y1: T + 8, y2: T + 8, class: "train" }));
  legend.append(el("text", { x: W - 175, y: T + 12 }, "training loss"));
  legend.append(el("line", { x1: W - 200, x2: W - 180, y1: T + 26, y2: T + 26, class: "val" }));
  legend.append(el("text", { x: W - 175, y: T + 30 }, "held-out loss"));
  svg.append(legend);
  svg.dataset.points = String(points.length);
}
