// The Generate view: completion and chat through the server's OpenAI endpoints, streamed, each token coloured
// by the probability the model gave it, its alternatives on hover or focus, a step mode, and Stop.
//
// Everything shown comes from the answers' `logprobs`: the model's own distribution (log-softmax of the raw
// logits), before temperature, top-k and top-p. The step mode redraws the distribution sampled from in
// the page (sampling.js), labelled as such.

import { ApiProblem, postJSON, stream } from "./api.js";
import { barChart, pct, probColour, showToken } from "./charts.js";
import { modelDistribution, sampledDistribution } from "./sampling.js";

const TOP = 20; // alternatives asked per token: chat's top_logprobs allows 20 at most
const $ = (id) => document.getElementById(id);

// What the view shows, also read by the browser tests (window.playground.generate).
export const state = {
  mode: "completion",
  base: "", // the completion prompt the shown tokens continue
  tokens: [], // {text, p, top: [[token, logprob], ...], picked}
  chat: [], // the conversation so far: {role, content}
  running: null, // the AbortController of the request in flight
  finish: null, // why the last answer ended
  steps: 0,
};

const tokenOf = new WeakMap(); // token element -> its entry in state.tokens (or a chat token)

export function setStatus(text, kind = "") {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind}`;
}

function settings() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = { max_tokens: num("max-tokens") ?? 16, temperature: num("temperature") ?? 1, top_p: num("top-p") ?? 1 };
  if (num("top-k")) body.top_k = num("top-k");
  if (num("seed") !== null) body.seed = num("seed");
  return body;
}

function tokenSpan(tok) {
  const span = document.createElement("span");
  span.className = tok.picked ? "tok picked" : "tok";
  span.tabIndex = 0;
  span.textContent = tok.text;
  span.style.background = probColour(tok.p);
  span.dataset.p = tok.p.toFixed(6);
  tokenOf.set(span, tok);
  return span;
}

function renderCompletion() {
  const out = $("output");
  const prompt = document.createElement("span");
  prompt.className = "prompt-text";
  prompt.textContent = state.base;
  out.replaceChildren(prompt, ...state.tokens.map(tokenSpan));
}

function busy(controller) {
  state.running = controller;
  $("generate").disabled = $("step").disabled = Boolean(controller);
  $("stop").disabled = !controller;
}

function fail(e) {
  if (e.name === "AbortError") {
    setStatus("Stopped: the request was cancelled, and the server freed its slot.");
  } else if (e instanceof ApiProblem) {
    setStatus(e.message, "error");
  } else {
    setStatus(`Something went wrong: ${e.message}`, "error");
  }
}

const FINISH = {
  stop: "the model ended the text (<|endoftext|>)",
  length: "max tokens reached (or the end of the model's context)",
};

// A completion streamed after `state.base` + the shown tokens.
async function streamCompletion() {
  const controller = new AbortController();
  busy(controller);
  setStatus("Generating…");
  const body = { ...settings(), prompt: state.base + state.tokens.map((t) => t.text).join(""), logprobs: TOP };
  const out = $("output");
  try {
    await stream("/v1/completions", body, (chunk) => {
      const choice = chunk.choices[0];
      const lp = choice?.logprobs;
      if (lp) {
        lp.tokens.forEach((text, k) => {
          const tok = { text, p: Math.exp(lp.token_logprobs[k]), top: Object.entries(lp.top_logprobs[k] || {}) };
          state.tokens.push(tok);
          out.append(tokenSpan(tok));
        });
      }
      if (choice?.finish_reason) state.finish = choice.finish_reason;
    }, controller.signal);
    setStatus(`Done: ${FINISH[state.finish] || state.finish}.`);
  } catch (e) {
    fail(e);
  } finally {
    busy(null);
  }
}

export function generate() {
  hideAlts();
  if (state.mode === "chat") return chat();
  state.base = $("prompt").value;
  state.tokens = [];
  state.finish = null;
  $("step-panel").hidden = true;
  renderCompletion();
  return streamCompletion();
}

// Continue from an alternative the user picked for token i: the tokens before it stay, it takes its place.
export function continueFrom(i, text, logprob) {
  if (state.running || state.mode !== "completion") return;
  hideAlts();
  const old = state.tokens[i];
  state.tokens = [...state.tokens.slice(0, i), { text, p: Math.exp(logprob), top: old.top, picked: true }];
  renderCompletion();
  return streamCompletion();
}

// One token: the answer's top_logprobs become the model's distribution, and what sampling drew from.
export async function step() {
  if (state.mode !== "completion") {
    setStatus("Step mode works on completions: switch the mode to Completion.", "error");
    return;
  }
  hideAlts();
  if (!state.tokens.length && !state.steps) {
    state.base = $("prompt").value;
    renderCompletion();
  }
  const controller = new AbortController();
  busy(controller);
  const s = settings();
  const body = { ...s, max_tokens: 1, prompt: state.base + state.tokens.map((t) => t.text).join(""), logprobs: TOP };
  try {
    const answer = await postJSON("/v1/completions", body, controller.signal);
    const choice = answer.choices[0];
    state.steps += 1;
    if (!choice.logprobs.tokens.length) {
      setStatus(`Step ${state.steps}: ${FINISH[choice.finish_reason] || choice.finish_reason}.`);
      return;
    }
    const text = choice.logprobs.tokens[0];
    const top = Object.entries(choice.logprobs.top_logprobs[0]);
    const tok = { text, p: Math.exp(choice.logprobs.token_logprobs[0]), top };
    state.tokens.push(tok);
    $("output").append(tokenSpan(tok));
    showDistribution(top, text, s);
    setStatus(`Step ${state.steps}: drew ${JSON.stringify(text)} (the model gave it ${pct(tok.p)}).`);
  } catch (e) {
    fail(e);
  } finally {
    busy(null);
  }
}

function showDistribution(top, chosen, s) {
  $("step-panel").hidden = false;
  const model = modelDistribution(top);
  const shown = model.reduce((a, [, p]) => a + p, 0);
  const outside = !model.some(([t]) => t === chosen); // a draw from the tail: named under the charts
  barChart($("model-bars"), model, { chosen, rest: 1 - shown });
  $("model-caption").textContent =
    `The model's distribution: its top ${model.length} tokens (${pct(shown)} of its mass), before temperature, top-k and top-p`;
  const { dist, exact } = sampledDistribution(top, { temperature: s.temperature, topK: s.top_k, topP: s.top_p });
  barChart($("sampled-bars"), dist.filter(([, p]) => p > 0), { chosen });
  const how = `temperature ${s.temperature}, top-k ${s.top_k || "off"}, top-p ${s.top_p}`;
  $("sampled-caption").textContent = exact
    ? `Sampled from, after ${how}: exact (the candidates are among the top ${model.length})`
    : `Sampled from, after ${how}: approximated over the model's top ${model.length} tokens, renormalised`;
  $("step-note").textContent = outside
    ? `This step drew ${JSON.stringify(chosen)}, a token outside the model's top ${model.length}: the rest of the distribution holds ${pct(1 - shown)}.`
    : `This step drew ${JSON.stringify(chosen)} (darker bar).`;
}

// Chat: the conversation so far plus the new user message, through /v1/chat/completions, streamed.
async function chat() {
  const text = $("prompt").value.trim();
  if (!text) return;
  const log = $("chat-log");
  const user = document.createElement("div");
  user.className = "msg user";
  user.textContent = text;
  const reply = document.createElement("div");
  reply.className = "msg assistant";
  log.append(user, reply);
  state.chat.push({ role: "user", content: text });
  $("prompt").value = "";
  const controller = new AbortController();
  busy(controller);
  setStatus("Generating…");
  let content = "";
  const body = { ...settings(), messages: state.chat, logprobs: true, top_logprobs: TOP };
  try {
    await stream("/v1/chat/completions", body, (chunk) => {
      const choice = chunk.choices[0];
      if (!choice) return;
      content += choice.delta?.content || "";
      for (const e of choice.logprobs?.content || []) {
        const tok = { text: e.token, p: Math.exp(e.logprob), top: e.top_logprobs.map((a) => [a.token, a.logprob]) };
        reply.append(tokenSpan(tok));
      }
      if (choice.finish_reason) state.finish = choice.finish_reason;
    }, controller.signal);
    setStatus(`Done: ${FINISH[state.finish] || state.finish}.`);
  } catch (e) {
    fail(e);
  } finally {
    state.chat.push({ role: "assistant", content });
    busy(null);
  }
}

export function stop() {
  if (state.running) state.running.abort();
}

export function clear() {
  stop();
  state.tokens = [];
  state.chat = [];
  state.base = "";
  state.steps = 0;
  $("output").replaceChildren();
  $("chat-log").replaceChildren();
  $("step-panel").hidden = true;
  hideAlts();
  setStatus("");
}

// --- the alternatives popover ----------------------------------------------------------------------

let altsFor = null; // the token element whose alternatives are shown
let hideTimer = 0;

export function showAlts(span) {
  const tok = tokenOf.get(span);
  if (!tok) return;
  clearTimeout(hideTimer);
  altsFor = span;
  const box = $("alts");
  const i = state.tokens.indexOf(tok); // -1 for chat tokens: they cannot be continued from
  const canPick = state.mode === "completion" && i >= 0 && !state.running;
  const head = document.createElement("p");
  head.className = "alts-head";
  head.textContent = `${showToken(tok.text)}: ${pct(tok.p)}${tok.picked ? " (picked by you)" : ""}`;
  const list = document.createElement("ol");
  const model = tok.top.map(([t, lp]) => [t, lp]).sort((a, b) => b[1] - a[1]);
  const most = Math.exp(model[0]?.[1] ?? 0) || 1; // bars relative to the most likely alternative
  for (const [t, lp] of model) {
    const li = document.createElement("li");
    const item = document.createElement(canPick ? "button" : "span");
    item.className = t === tok.text ? "alt current" : "alt";
    const bar = document.createElement("span");
    bar.className = "alt-bar";
    bar.style.width = `${Math.max(2, (60 * Math.exp(lp)) / most)}px`;
    bar.style.background = probColour(Math.exp(lp));
    const label = document.createElement("span");
    label.className = "alt-token";
    label.textContent = showToken(t);
    const num = document.createElement("span");
    num.className = "alt-p";
    num.textContent = pct(Math.exp(lp));
    item.append(label, bar, num);
    if (canPick) {
      item.type = "button";
      item.title = "continue the text from this token";
      item.addEventListener("click", () => continueFrom(i, t, lp));
    }
    li.append(item);
    list.append(li);
  }
  const foot = document.createElement("p");
  foot.className = "muted small";
  foot.textContent = canPick
    ? "The model's probabilities. Pick one to continue from it."
    : "The model's probabilities, before temperature and filters.";
  box.replaceChildren(head, list, foot);
  box.hidden = false;
  const r = span.getBoundingClientRect();
  const width = Math.min(280, window.innerWidth - 16);
  box.style.width = `${width}px`;
  box.style.left = `${Math.max(8, Math.min(r.left + window.scrollX, window.scrollX + window.innerWidth - width - 8))}px`;
  box.style.top = `${r.bottom + window.scrollY + 6}px`;
}

export function hideAlts() {
  altsFor = null;
  $("alts").hidden = true;
}

function hideSoon() {
  clearTimeout(hideTimer);
  hideTimer = setTimeout(() => {
    const box = $("alts");
    if (!box.matches(":hover") && !box.contains(document.activeElement) && document.activeElement !== altsFor) {
      hideAlts();
    }
  }, 250);
}

export function setMode(mode) {
  stop();
  state.mode = mode;
  const chatMode = mode === "chat";
  $("chat-log").hidden = !chatMode;
  $("output").hidden = chatMode;
  $("step").disabled = chatMode;
  $("step-panel").hidden = true;
  $("prompt-label").firstChild.textContent = chatMode ? "Your message " : "Prompt ";
  hideAlts();
}

export function wireTokens() {
  // delegation: tokens come and go as text streams in
  const isTok = (e) => e.target instanceof Element && e.target.classList.contains("tok");
  document.addEventListener("mouseover", (e) => isTok(e) && showAlts(e.target));
  document.addEventListener("focusin", (e) => isTok(e) && showAlts(e.target));
  document.addEventListener("mouseout", (e) => isTok(e) && hideSoon());
  document.addEventListener("focusout", (e) => (isTok(e) || $("alts").contains(e.target)) && hideSoon());
  $("alts").addEventListener("mouseleave", hideSoon);
  document.addEventListener("keydown", (e) => {
    if (isTok(e) && (e.key === "Enter" || e.key === "ArrowDown")) {
      // into the alternatives, so a keyboard user can pick one too
      showAlts(e.target);
      $("alts").querySelector("button, .alt")?.focus?.();
      e.preventDefault();
    } else if ($("alts").contains(e.target) && e.key === "Escape" && altsFor) {
      altsFor.focus();
      e.stopPropagation();
    }
  });
}
