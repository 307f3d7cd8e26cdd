// The Attention view: POST /v1/nanogpt/attention for a prompt, then one layer's head (or the average over
// its heads) drawn as a heatmap, queries down, keys across, with the token strings on both axes.
// A canvas, since a long prompt has T^2 cells; the matrix drawn is kept in `view.drawn` (read by the tests).

import { ApiProblem, postJSON } from "./api.js";
import { showToken } from "./charts.js";
import { setStatus } from "./generate.js";

const $ = (id) => document.getElementById(id);

export const view = { data: null, drawn: null }; // the endpoint's answer; {layer, head, tokens, matrix}

export async function load() {
  const prompt = $("att-prompt").value;
  $("att-go").disabled = true;
  setStatus("Computing attention…");
  try {
    view.data = await postJSON("/v1/nanogpt/attention", { prompt });
    $("att-go").disabled = false;
    fillPickers(view.data.layers, view.data.heads);
    draw();
    setStatus(`Attention of ${view.data.tokens.length} tokens, ${view.data.layers} layers × ${view.data.heads} heads.`);
  } catch (e) {
    setStatus(e instanceof ApiProblem ? e.message : `Something went wrong: ${e.message}`, "error");
  } finally {
    $("att-go").disabled = false;
  }
}

function fillPickers(layers, heads) {
  const layer = $("att-layer"), head = $("att-head");
  const keepL = Math.min(Number(layer.value) || 0, layers - 1);
  const keepH = head.value || "avg";
  layer.replaceChildren(...Array.from({ length: layers }, (_, i) => new Option(`${i + 1} of ${layers}`, i)));
  head.replaceChildren(
    new Option("average over heads", "avg"),
    ...Array.from({ length: heads }, (_, i) => new Option(`${i + 1} of ${heads}`, i)),
  );
  layer.value = String(keepL);
  head.value = keepH === "avg" || Number(keepH) < heads ? keepH : "avg";
}

// The (T, T) matrix of the picked layer and head, or the mean of the layer's heads (rows still sum to 1).
function matrixOf(layer, head) {
  const heads = view.data.attention[layer];
  if (head !== "avg") return heads[Number(head)];
  const T = heads[0].length;
  return Array.from({ length: T }, (_, i) =>
    Array.from({ length: T }, (_, j) => heads.reduce((s, h) => s + h[i][j], 0) / heads.length),
  );
}

export function draw() {
  if (!view.data) return;
  const layer = Number($("att-layer").value), head = $("att-head").value;
  const m = matrixOf(layer, head);
  const tokens = view.data.tokens.map(showToken);
  const T = tokens.length;
  const canvas = $("heatmap");
  const wrap = canvas.parentElement.clientWidth || 600;
  const label = Math.min(120, 12 + 7 * Math.max(...tokens.map((t) => Math.min(t.length, 14))));
  // the whole map in view: as wide as the panel and about as tall as the window allows
  const room = Math.min(Math.max(wrap, 300), Math.max(360, window.innerHeight - 150));
  const cell = Math.max(3, Math.min(28, Math.floor((room - label - 8) / T)));
  const size = label + cell * T + 4;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = size * dpr;
  canvas.height = size * dpr;
  canvas.style.width = `${size}px`;
  canvas.style.height = `${size}px`;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, size, size);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < T; j++) {
      // white (0) to deep blue (1), on a square-root scale: most weights are small
      const v = Math.sqrt(Math.max(0, m[i][j]));
      ctx.fillStyle = j > i ? "#f3f3f3" : `rgb(${255 - 225 * v}, ${255 - 170 * v}, ${255 - 60 * v})`;
      ctx.fillRect(label + j * cell, label + i * cell, cell - (cell > 6 ? 1 : 0), cell - (cell > 6 ? 1 : 0));
    }
  }
  if (cell >= 8) {
    ctx.fillStyle = "#222";
    ctx.font = `${Math.min(12, cell - 2)}px system-ui, sans-serif`;
    ctx.textBaseline = "middle";
    tokens.forEach((t, i) => {
      const s = t.length > 14 ? `${t.slice(0, 13)}…` : t;
      ctx.textAlign = "right";
      ctx.fillText(s, label - 4, label + i * cell + cell / 2); // queries, down the left
      ctx.save();
      ctx.translate(label + i * cell + cell / 2, label - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(s, 0, 0); // keys, across the top
      ctx.restore();
    });
  }
  view.drawn = { layer, head, tokens: view.data.tokens, matrix: m, cell, label };
  canvas.dataset.rows = String(T);
  canvas.dataset.cols = String(m[0]?.length ?? 0);
  const which = head === "avg" ? "the average over its heads" : `head ${Number(head) + 1}`;
  $("heat-info").textContent = `Layer ${layer + 1}, ${which}: ${T} × ${T}.`;
}

export function wireHeatmap() {
  const canvas = $("heatmap");
  canvas.addEventListener("mousemove", (e) => {
    const d = view.drawn;
    if (!d) return;
    const r = canvas.getBoundingClientRect();
    const j = Math.floor((e.clientX - r.left - d.label) / d.cell);
    const i = Math.floor((e.clientY - r.top - d.label) / d.cell);
    if (i < 0 || j < 0 || i >= d.matrix.length || j >= d.matrix.length) return;
    const q = showToken(d.tokens[i]), k = showToken(d.tokens[j]);
    $("heat-info").textContent = j > i
      ? `"${q}" (position ${i}) cannot see "${k}" (position ${j}): it comes later.`
      : `"${q}" (position ${i}) → "${k}" (position ${j}): ${(100 * d.matrix[i][j]).toFixed(2)}% of its attention.`;
  });
}
