// Talking to this server: JSON calls, server-sent-event streams, and one readable message per failure.
// Every request goes to the page's own origin (relative URLs); the API key lives in this module's memory
// only and travels as a Bearer header, never in a URL or in storage.

let apiKey = "";

export function setApiKey(key) {
  apiKey = key.trim();
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey) h["Authorization"] = `Bearer ${apiKey}`;
  return h;
}

// An error the page shows as it is: what happened and what to do about it.
export class ApiProblem extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Why a request failed, in the words a user needs: a full queue (429) and a draining server (503) are
// normal states of a busy server, not crashes, so they get their own sentence and the page stays usable.
async function problemOf(response) {
  let detail = "";
  try {
    detail = (await response.json()).error?.message || "";
  } catch {
    /* a body that is not OpenAI's error JSON: the status says enough */
  }
  const s = response.status;
  if (s === 401) return new ApiProblem(s, "This server needs an API key: enter it at the top of the page.");
  if (s === 429) {
    const wait = response.headers.get("Retry-After") || "1";
    return new ApiProblem(s, `The server is busy: its queue is full (429). Try again in ${wait} s.`);
  }
  if (s === 503) return new ApiProblem(s, `The server is shutting down or draining (503): ${detail || "try again later"}.`);
  if (s === 408) return new ApiProblem(s, `The request took longer than the server's --request-timeout (408).`);
  return new ApiProblem(s, `${s}: ${detail || response.statusText}`);
}

export async function getJSON(path) {
  let response;
  try {
    response = await fetch(path, { headers: headers(false) });
  } catch {
    throw new ApiProblem(0, "The server cannot be reached: is `nanogpt serve` still running?");
  }
  if (!response.ok) throw await problemOf(response);
  return response.json();
}

export async function postJSON(path, body, signal) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiProblem(0, "The server cannot be reached: is `nanogpt serve` still running?");
  }
  if (!response.ok) throw await problemOf(response);
  return response.json();
}

// POST with "stream": true and call onData(object) for each `data:` event until [DONE]. Aborting `signal`
// closes the connection, which the server sees at once and answers by cancelling the job (its slot frees).
export async function stream(path, body, onData, signal) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiProblem(0, "The server cannot be reached: is `nanogpt serve` still running?");
  }
  if (!response.ok) throw await problemOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        // an error after the stream began (timeout, shutdown past its drain) comes as an event, not a status
        if (obj.error) throw new ApiProblem(500, `The server stopped this answer: ${obj.error.message}`);
        onData(obj);
      }
    }
  }
}
