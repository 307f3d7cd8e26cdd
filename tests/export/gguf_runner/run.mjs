// Runs a GGUF in llama.cpp (node-llama-cpp's prebuilt CPU binaries) and prints one JSON line:
//   {"ids": the prompt's token ids, "greedy": N greedy tokens after it,
//    "top": [[id, p], ...] the K likeliest first next tokens, "n_ctx_train": the GGUF's context}
// Usage: node run.mjs MODEL.gguf PROMPT N [--top K] [--kv f16|f32] [--flash auto|on|off]
// --kv and --flash pick llama.cpp's KV-cache type and flash attention; their defaults are llama.cpp's own
// (an f16 cache, flash attention where the backend has it), which is what Ollama and LM Studio users get.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const args = process.argv.slice(2);
const option = (name, fallback) => {
    const i = args.indexOf(name);
    return i < 0 ? fallback : args.splice(i, 2)[1];
};
const topK = Number(option("--top", "5"));
const kv = option("--kv", "f16").toUpperCase();
const flash = {auto: "auto", on: true, off: false}[option("--flash", "auto")];
const [modelPath, prompt, nText] = args;
const n = Number(nText);
if (!modelPath || prompt === undefined || !(n > 0) || flash === undefined)
    throw new Error("usage: node run.mjs MODEL.gguf PROMPT N [--top K] [--kv f16|f32] [--flash auto|on|off]");

// CPU only, never a build or a download: the test measures llama.cpp's kernels as they ship
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const ids = model.tokenize(prompt); // as text: no special tokens, no BOS (the GGUF says add_bos false)
const context = await model.createContext({
    contextSize: model.trainContextSize, threads: 2, flashAttention: flash,
    experimentalKvCacheKeyType: kv, experimentalKvCacheValueType: kv
});
const sequence = context.getSequence();

const greedy = [];
let top = null;
// temperature 0 is greedy with no other sampler in the chain, so `probabilities` covers every token
const steps = sequence.evaluateWithMetadata(ids, {probabilities: true}, {temperature: 0, yieldEogToken: true});
for await (const {token, probabilities} of steps) {
    if (top === null) {
        // node-llama-cpp sums the softmax in float32 from the largest term down, which drops the tail
        // (terms under half an ulp of the sum): renormalise in float64 to get the logits' own softmax
        let total = 0;
        for (const p of probabilities.values())
            total += p;
        top = [...probabilities.entries()].sort((a, b) => b[1] - a[1]).slice(0, topK)
            .map(([id, p]) => [id, p / total]);
    }
    greedy.push(token);
    if (greedy.length >= n)
        break;
}
console.log(JSON.stringify({ids: Array.from(ids), greedy, top, n_ctx_train: model.trainContextSize}));
await context.dispose();
await model.dispose();
await llama.dispose();
