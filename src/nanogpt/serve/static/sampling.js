// The distribution a token is actually drawn from, rebuilt in the page from the server's top_logprobs.
//
// The server reports the model's own log-probabilities (log-softmax of the raw logits, before temperature
// and filters) for the top N tokens. It samples after dividing the logits by the temperature, keeping the
// top-k, then the nucleus (top-p) over those k (`infer/sampling.py`). We redo those steps on the N tokens we
// have. That is exact when the server's candidates are among them (greedy, or a top-k <= N); otherwise the
// tokens outside the top N are left out and the rest renormalised: an approximation over the top N, and
// the page labels it so.

// [[token, logprob], ...] -> [[token, probability], ...], most likely first
export function modelDistribution(top) {
  return top.map(([t, lp]) => [t, Math.exp(lp)]).sort((a, b) => b[1] - a[1]);
}

// The sampled-from distribution over the same tokens: {dist: [[token, p]], exact: bool}.
export function sampledDistribution(top, { temperature, topK, topP }) {
  const sorted = [...top].sort((a, b) => b[1] - a[1]);
  if (!sorted.length) return { dist: [], exact: true };
  if (temperature === 0) {
    // greedy: the most likely token always
    return { dist: sorted.map(([t], i) => [t, i === 0 ? 1 : 0]), exact: true };
  }
  const k = topK && topK > 0 ? Math.min(topK, sorted.length) : sorted.length;
  const scaled = sorted.map(([t, lp], i) => [t, i < k ? lp / temperature : -Infinity]);
  const m = scaled[0][1];
  let z = 0;
  for (const [, s] of scaled) z += Math.exp(s - m);
  let probs = scaled.map(([t, s]) => [t, Math.exp(s - m) / z]);
  if (topP < 1) {
    // drop a token once the more likely ones already hold top_p of the mass (the first always stays)
    let before = 0;
    probs = probs.map(([t, p]) => {
      const keep = before < topP;
      before += p;
      return [t, keep ? p : 0];
    });
    const kept = probs.reduce((s, [, p]) => s + p, 0);
    probs = probs.map(([t, p]) => [t, p / kept]);
  }
  return { dist: probs, exact: Boolean(topK && topK > 0 && topK <= sorted.length) };
}
