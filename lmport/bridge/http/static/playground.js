// The chat page: settings, a transcript, one streamed reply at a time, Stop, tokens/s, and the API key when the
// server asks for one (a 401 opens the key dialog; the key lives in sessionStorage, so only for this tab).
import { AuthError, listModels, streamChat } from "./api.js";

const KEY = "lmport.apiKey";
const $ = (id) => document.getElementById(id);
const history = []; // {role, content} of the finished turns
let running = null; // the AbortController of the reply in flight

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function askKey(reason) {
  $("key-reason").textContent = reason;
  $("key-input").value = "";
  $("key-dialog").showModal();
  return new Promise((resolve) => $("key-dialog").addEventListener("close", () => {
    sessionStorage.setItem(KEY, $("key-input").value);
    resolve();
  }, { once: true }));
}

// Runs fn(key); a 401 asks for a key and runs it again.
async function withKey(fn) {
  for (;;) {
    try {
      return await fn(sessionStorage.getItem(KEY));
    } catch (error) {
      if (!(error instanceof AuthError)) throw error;
      await askKey(sessionStorage.getItem(KEY) ? `The key was refused: ${error.message}` : "This server needs an API key.");
    }
  }
}

function bubble(role, text) {
  const item = document.createElement("li");
  item.className = role;
  item.textContent = text;
  $("transcript").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showRate(tokens, started) {
  const seconds = (performance.now() - started) / 1000;
  $("stats").textContent = `${tokens} tokens · ${seconds > 0 ? (tokens / seconds).toFixed(1) : "–"} tok/s`;
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, { role: "user", content: text }];
  const request = { model: $("model").value, messages, temperature: Number($("temperature").value),
                    max_tokens: Number($("max-tokens").value) };
  bubble("user", text);
  const reply = bubble("assistant streaming", "");
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…", "streaming");
  const started = performance.now();
  let tokens = 0;
  let outcome = "done";
  try {
    await withKey(async (key) => {
      for await (const chunk of streamChat(request, key, running.signal)) {
        if (chunk.usage) tokens = chunk.usage.completion_tokens; // the exact count, at the end
        for (const choice of chunk.choices) {
          if (choice.delta.role === undefined) tokens += 1; // after the role chunk, one chunk per engine step
          reply.textContent += choice.delta.content ?? "";
        }
        showRate(tokens, started);
        reply.scrollIntoView({ block: "end" });
      }
    });
  } catch (error) {
    if (error.name === "AbortError") {
      outcome = "stopped";
      reply.classList.add("stopped");
    } else {
      outcome = "error";
      reply.classList.add("error");
      reply.textContent += (reply.textContent ? "\n" : "") + error.message;
    }
  } finally {
    reply.classList.remove("streaming");
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (outcome !== "error") history.push({ role: "user", content: text }, { role: "assistant", content: reply.textContent });
  setStatus(outcome, outcome === "error" ? "error" : outcome);
}

async function loadModels() {
  try {
    const models = await withKey(listModels);
    $("model").replaceChildren(...models.map((id) => new Option(id, id)));
    setStatus("ready", "idle");
  } catch (error) {
    setStatus(`cannot list models: ${error.message}`, "error");
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || running) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running?.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  $("transcript").replaceChildren();
  $("stats").textContent = "";
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
loadModels();
