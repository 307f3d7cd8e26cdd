// The Run story view: GET /v1/nanogpt/run, what the served model is and how it was trained: the config,
// the parameter counts as `nanogpt info` prints them, the lineage, held-out perplexity and the loss curve.

import { getJSON } from "./api.js";
import { lossCurve } from "./charts.js";

const $ = (id) => document.getElementById(id);
const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : String(n));

export const view = { story: null };

function fact(term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  $("facts").append(dt, dd);
}

export async function load() {
  const story = await getJSON("/v1/nanogpt/run");
  view.story = story;
  const c = story.config;
  $("model-line").textContent =
    `${story.model} (${story.dtype}): ${c.n_layers} layers, ${c.n_heads} heads, width ${c.d_model}, context ${c.context_length}`;
  $("facts").replaceChildren();
  fact("parameters", `${fmt(story.parameters.unique)} unique; ${fmt(story.parameters.counted_twice)} counting the tied embedding twice (the card's way)`);
  fact("shape", `${c.n_layers} layers × ${c.n_heads} heads, d_model ${c.d_model}, d_ff ${c.d_ff}, context ${c.context_length} tokens, vocabulary ${fmt(c.vocab_size)}`);
  fact("precision served", story.dtype);
  const h = story.held_out;
  if (h && h.perplexity !== undefined) {
    fact("held-out perplexity", `${h.perplexity.toFixed(1)} (loss ${h.loss.toFixed(3)} at step ${h.step}, from the run's evaluations)`);
  }
  if (h && h.sliding_window_perplexity !== undefined) {
    fact("held-out perplexity, sliding window", `${h.sliding_window_perplexity.toFixed(1)} (nanogpt demo's score of the val split)`);
  }
  if (!h) fact("held-out perplexity", "not known: this folder has no training log");
  $("lineage").replaceChildren(
    ...(story.lineage || []).map((s) => {
      const li = document.createElement("li");
      const parts = [`${s.name}: ${fmt(s.iterations)} iterations`];
      if (s.tokens) parts.push(`${fmt(s.tokens)} tokens`);
      if (s.batch) parts.push(`batch ${s.batch}`);
      if (s.learning_rate) parts.push(`learning rate ${s.learning_rate}`);
      if (s.final_val_loss) parts.push(`final held-out loss ${s.final_val_loss.toFixed(3)}`);
      if (s.teacher) parts.push(`teacher ${typeof s.teacher === "string" ? s.teacher : JSON.stringify(s.teacher)}`);
      li.textContent = parts.join(", ");
      return li;
    }),
  );
  if (!story.lineage) $("lineage").innerHTML = "<li>not known: a checkpoint without its run folder</li>";
  $("config").textContent = JSON.stringify(c, null, 2);
  const curve = story.loss_curve || [];
  lossCurve($("loss-curve"), curve);
  const evals = curve.filter((p) => p.val_loss !== null).length;
  $("curve-note").textContent = curve.length
    ? `${curve.length} logged steps, ${evals} held-out evaluations (log.jsonl). A falling held-out loss is the model learning what generalises; a gap that opens between the two lines is memorisation.`
    : "No loss curve: this folder has no log.jsonl (a bare checkpoint).";
  return story;
}
