// The page's entry point: the tabs, the keyboard, the API key field, and the server's defaults in the
// controls. Each view lives in its own module (generate.js, attention.js, story.js).

import { ApiProblem, setApiKey } from "./api.js";
import * as attention from "./attention.js";
import { probColour } from "./charts.js";
import * as gen from "./generate.js";
import * as story from "./story.js";

const $ = (id) => document.getElementById(id);
const TABS = ["generate", "attention", "story"];

// what the browser tests read: the data each view drew, not only its pixels
window.playground = { generate: gen.state, attention: attention.view, story: story.view, probColour };

function show(name) {
  for (const t of TABS) {
    const selected = t === name;
    $(`tab-${t}`).setAttribute("aria-selected", String(selected));
    $(`view-${t}`).hidden = !selected;
  }
  gen.hideAlts();
  if (!gen.state.running) gen.setStatus("");
  if (name === "attention" && !attention.view.data) {
    // start from what the Generate view holds, so the two views talk about the same text
    const text = gen.state.base + gen.state.tokens.map((t) => t.text).join("");
    if (text.trim()) $("att-prompt").value = text;
  }
}

let defaults = null;
let maxTokensTouched = false;

function applyDefaults() {
  if (!defaults) return;
  $("temperature").value = defaults.temperature;
  $("top-p").value = defaults.top_p;
  $("top-k").value = defaults.top_k ?? "";
  $("seed").value = defaults.seed ?? "";
  if (!maxTokensTouched) {
    $("max-tokens").value = gen.state.mode === "chat" ? defaults.chat_max_tokens : defaults.max_tokens;
  }
}

async function loadStory() {
  try {
    const s = await story.load();
    defaults = s.defaults;
    applyDefaults();
    gen.setStatus("");
  } catch (e) {
    gen.setStatus(e instanceof ApiProblem ? e.message : `Could not read the run: ${e.message}`, "error");
    if (e.status === 401) $("api-key").focus();
  }
}

function wire() {
  for (const t of TABS) $(`tab-${t}`).addEventListener("click", () => show(t));
  $("gen-form").addEventListener("submit", (e) => {
    e.preventDefault();
    gen.generate();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault(); // Enter generates; Shift+Enter is a new line
      if (!gen.state.running) gen.generate();
    }
  });
  $("step").addEventListener("click", () => gen.step());
  $("stop").addEventListener("click", () => gen.stop());
  $("clear").addEventListener("click", () => gen.clear());
  $("max-tokens").addEventListener("input", () => (maxTokensTouched = true));
  for (const b of document.querySelectorAll(".example")) {
    b.addEventListener("click", () => {
      $("prompt").value = b.textContent;
      $("prompt").focus();
    });
  }
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.addEventListener("change", () => {
      gen.setMode(r.value);
      applyDefaults();
    });
  }
  $("key-form").addEventListener("submit", (e) => e.preventDefault()); // Enter in the key field: no page load
  $("api-key").addEventListener("change", () => {
    setApiKey($("api-key").value);
    loadStory();
  });
  $("att-form").addEventListener("submit", (e) => {
    e.preventDefault();
    attention.load();
  });
  $("att-layer").addEventListener("change", attention.draw);
  $("att-head").addEventListener("change", attention.draw);
  // Escape stops a running request wherever the focus is (the alternatives popover takes it first)
  window.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (gen.state.running) gen.stop();
    else gen.hideAlts();
  });
  gen.wireTokens();
  attention.wireHeatmap();
}

function paintLegend() {
  for (const s of document.querySelectorAll(".swatch")) s.style.background = probColour(Number(s.dataset.p));
}

wire();
paintLegend();
loadStory();
