// Chats with a GGUF through node-llama-cpp's chat API (the chat wrapper it resolves from the file's
// tokenizer.chat_template) and prints one JSON line:
//   {"wrapper": the chat wrapper's name, "ids": the token ids of the whole history it renders,
//    "prompt_ids": the ids of the history without its last reply plus the generation prompt,
//    "reply": the greedy reply of a chat session to the last user message (up to N tokens)}
// Usage: node chat.mjs MODEL.gguf HISTORY.json N   (HISTORY: [{"role", "content"}, ...] ending with an
// assistant reply, in the OpenAI form; an f32 KV cache without flash attention, so greedy matches ours)
import fs from "node:fs";
import {getLlama, LlamaChatSession, LlamaLogLevel, resolveChatWrapper} from "node-llama-cpp";

const [modelPath, historyPath, nText] = process.argv.slice(2);
const messages = JSON.parse(fs.readFileSync(historyPath, "utf8"));
const toItem = (m) => m.role === "system" ? {type: "system", text: m.content}
    : m.role === "user" ? {type: "user", text: m.content} : {type: "model", response: [m.content]};

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const wrapper = resolveChatWrapper(model);
const render = (items) => wrapper.generateContextState({chatHistory: items}).contextText.tokenize(model.tokenizer);
const history = messages.map(toItem);
const asked = [...history.slice(0, -1), {type: "model", response: []}];  // the reply still to come

const context = await model.createContext({
    contextSize: model.trainContextSize, threads: 2, flashAttention: false,
    experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"
});
const session = new LlamaChatSession({contextSequence: context.getSequence(), chatWrapper: wrapper});
session.setChatHistory(history.slice(0, -2));
const user = history[history.length - 2].text;
const reply = await session.prompt(user, {maxTokens: Number(nText), temperature: 0});
console.log(JSON.stringify({
    wrapper: wrapper.wrapperName, ids: Array.from(render(history)), prompt_ids: Array.from(render(asked)), reply
}));
await context.dispose();
await model.dispose();
await llama.dispose();
