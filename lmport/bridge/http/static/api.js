// The server's OpenAI-compatible API as the playground uses it: the model list, and a chat completion streamed
// over server-sent events (fetch + a stream reader: EventSource cannot POST). Same origin, so no base URL.

export class AuthError extends Error {}

function headers(apiKey) {
  const out = { "Content-Type": "application/json" };
  if (apiKey) out.Authorization = `Bearer ${apiKey}`;
  return out;
}

async function check(response) {
  if (response.status === 401) throw new AuthError((await response.json()).error.message);
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new Error(body?.error ? `${body.error.param ? body.error.param + ": " : ""}${body.error.message}`
                                : `HTTP ${response.status}`);
  }
  return response;
}

export async function listModels(apiKey) {
  const response = await check(await fetch("/v1/models", { headers: headers(apiKey) }));
  return (await response.json()).data.map((model) => model.id);
}

// Yields each `chat.completion.chunk`; aborting `signal` closes the connection, which aborts the engine request.
export async function* streamChat(request, apiKey, signal) {
  const response = await check(await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(apiKey), signal,
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
  }));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      yield chunk;
    }
  }
}
