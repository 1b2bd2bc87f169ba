// The page's only script: streams /v1/completions (server-sent events over fetch) into the page.
// Every piece of user or model text goes in through text nodes (textContent / appendData),
// never innerHTML, so a prompt such as <script>alert(1)</script> is shown, not run.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function setState(state, message, isError) {
  document.body.dataset.state = state; // idle | running | done | stopped | error (tests read it)
  $("status").textContent = message || "";
  $("status").classList.toggle("error", Boolean(isError));
  const running = state === "running";
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

function numberField(id, { integer = false, optional = false } = {}) {
  const raw = $(id).value.trim();
  if (raw === "" && optional) return undefined;
  const value = Number(raw);
  if (raw === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`${id} must be ${integer ? "an integer" : "a number"}`);
  }
  return value;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    max_tokens: numberField("max_tokens", { integer: true }),
    temperature: numberField("temperature"),
    top_k: numberField("top_k", { integer: true }),
    top_p: numberField("top_p"),
    stream: true,
  };
  if (!$("stop_at_eot").checked) body.ignore_eos = true;
  const seed = numberField("seed", { integer: true, optional: true });
  if (seed !== undefined) body.seed = seed;
  return body;
}

async function errorMessage(response) {
  try {
    const data = await response.json();
    if (data && data.error && data.error.message) return data.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// The API's fetch: with the server's API key when one was given. A 401 asks for the key once
// (kept for this tab only, in sessionStorage) and sends the request again with it.
const KEY_ITEM = "gpt2tf-api-key";

function withKey(options) {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  return { ...options, headers };
}

async function apiFetch(url, options = {}) {
  const response = await fetch(url, withKey(options));
  if (response.status !== 401) return response;
  const key = window.prompt("This server needs its API key (--api_key):");
  if (!key) return response;
  sessionStorage.setItem(KEY_ITEM, key.trim());
  const retried = await fetch(url, withKey(options));
  if (retried.status === 401) sessionStorage.removeItem(KEY_ITEM); // wrong: ask next time
  return retried;
}

// Split an SSE byte stream into events; call onData with each "data:" payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onData(data) === false) return;
    }
  }
}

async function generate(event) {
  event.preventDefault();
  let body;
  try {
    body = requestBody();
  } catch (e) {
    setState("error", e.message, true);
    return;
  }
  $("out-prompt").textContent = body.prompt;
  const outText = $("out-text");
  outText.textContent = "";
  const text = document.createTextNode("");
  outText.appendChild(text);
  controller = new AbortController();
  setState("running", "generating…");
  let finish = null;
  try {
    const response = await apiFetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      setState("error", await errorMessage(response), true);
      return;
    }
    await readEvents(response, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.text) text.appendData(choice.text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      return true;
    });
    const why = finish === "stop" ? "end of text or stop string" : "length reached";
    setState("done", `done (${why})`);
  } catch (e) {
    if (e.name === "AbortError") setState("stopped", "stopped");
    else setState("error", e.message, true);
  } finally {
    controller = null;
  }
}

function stop() {
  // Aborting the fetch closes the connection; the server then drops this generation.
  if (controller) controller.abort();
}

async function showModel() {
  try {
    const response = await apiFetch("/v1/models");
    const data = await response.json();
    if (data.data && data.data.length) $("model").textContent = data.data[0].id;
  } catch (e) { /* the title just stays without the model name */ }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("stop").addEventListener("click", stop);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  setState("idle", "");
  showModel();
});
