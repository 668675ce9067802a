// Against the real worker (`python -m lmport.bridge.worker`) on the bundled model: one worker shared by the calls,
// fresh ones where a test kills or closes its worker.
import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  LMPortError, Worker, findPython, type ChunkOutput, type CompletionOutput, type HandleMap, type RequestMetrics, type RequestOutput,
  type EmbedResult, type SpawnOptions, type Summary, type Usage,
} from "../src/index.js";
import { groupAlive, waitFor } from "./helpers.js";

// Small KV cache and context: tests stay light on a shared machine.
const ENGINE = { dtype: "float32", max_model_len: 512, kv_cache_memory_bytes: 64 << 20 } as const;
const SPAWN: SpawnOptions = { stderr: "ignore", env: { ...process.env, OMP_NUM_THREADS: "1" } };
const LONG = { max_tokens: 400, ignore_eos: true, temperature: 0 };

let worker: Worker;
let llm: HandleMap;

before(async () => {
  worker = await Worker.spawn(SPAWN);
  llm = await worker.llm("smollm2", ENGINE);
});

after(async () => {
  await worker?.close();
});

async function engineStats(): Promise<Record<string, number>> {
  return (await worker.stats({ llm })) as Record<string, number>;
}

async function expectError(promise: Promise<unknown>, code: string): Promise<LMPortError> {
  const error = await promise.then(() => assert.fail(`expected ${code}`), (e: unknown) => e);
  assert.ok(error instanceof LMPortError, `not an LMPortError: ${String(error)}`);
  assert.equal(error.code, code, error.message);
  return error;
}

test("hello and ping", async () => {
  assert.equal(worker.hello.protocol, 1);
  assert.ok(worker.hello.methods.includes("generate"));
  assert.equal(worker.pgid, worker.pid); // detached: the worker leads its own group
  const pong = await worker.ping({ n: 7 });
  assert.equal(pong.n, 7);
});

test("generate returns RequestOutputs", async () => {
  const outs = await worker.generate(llm, ["The capital of France is", "1, 2, 3,"],
    { sampling_params: { max_tokens: 6, temperature: 0 } });
  assert.equal(outs.length, 2);
  for (const out of outs) {
    assert.equal(out.finished, true);
    assert.equal(out.outputs[0].token_ids.length, 6);
    assert.equal(typeof out.outputs[0].text, "string");
    assert.equal(out.outputs[0].finish_reason, "length");
  }
});

test("a LoRA adapter (lora_request) changes the output; an engine without enable_lora refuses it", async () => {
  const { python, projectRoot } = findPython();
  const dir = join(mkdtempSync(join(tmpdir(), "lmport-lora-")), "adapter");
  execFileSync(python, [join(projectRoot ?? join(process.cwd(), "..", ".."), "tests", "make_lora_adapter.py"), dir],
    { stdio: "ignore" });
  const adapter = { lora_name: "smol-test", lora_int_id: 1, lora_path: dir };
  const lora = await worker.llm("smollm2", { ...ENGINE, enable_lora: true, max_lora_rank: 8 });
  const greedy = { max_tokens: 10, temperature: 0 };
  const [base, tuned] = await worker.generate(lora, ["The capital of France is", "The capital of France is"],
    { sampling_params: greedy, lora_request: [null, adapter] });
  assert.notEqual(tuned.outputs[0].text, base.outputs[0].text);
  const bad = await expectError(worker.generate(llm, "x", { sampling_params: greedy, lora_request: adapter }),
    "invalid_params");
  assert.equal(bad.details.field, "lora_request");
  await worker.release(lora);
});

test("chat applies the template", async () => {
  const outs = await worker.chat(llm, [{ role: "user", content: "Say hi." }],
    { sampling_params: { max_tokens: 5, temperature: 0 } });
  assert.equal(outs.length, 1);
  assert.ok(outs[0].prompt_token_ids.length > 5);
  assert.ok(outs[0].outputs[0].text.length > 0);
});

test("structured outputs: a JSON schema gives a parsed object, a bad schema names the field", async () => {
  const schema = {
    type: "object",
    properties: { city: { type: "string", maxLength: 20 }, population: { type: "integer", minimum: 0 } },
    required: ["city", "population"],
  };
  const [out] = await worker.chat(llm, [{ role: "user", content: "Describe a city as JSON." }],
    { sampling_params: { max_tokens: 60, temperature: 0, structured_outputs: { json: schema } } });
  assert.equal(out.outputs[0].finish_reason, "stop");
  const city = JSON.parse(out.outputs[0].text);
  assert.equal(typeof city.city, "string");
  assert.ok(Number.isInteger(city.population) && city.population >= 0);
  const [choice] = await worker.generate(llm, "Answer:",
    { sampling_params: { max_tokens: 5, temperature: 0, structured_outputs: { choice: ["left", "right"] } } });
  assert.ok(["left", "right"].includes(choice.outputs[0].text));
  const bad = await expectError(worker.generate(llm, "x",
    { sampling_params: { structured_outputs: { regex: "[a-" } } }), "invalid_params");
  assert.equal(bad.details.field, "sampling_params.structured_outputs.regex");
});

test("tool calling: a forced call comes back as plain data, its result goes back as a tool message", async () => {
  const weather = {
    type: "function",
    function: {
      name: "get_weather", description: "Current weather of a city",
      parameters: { type: "object", properties: { city: { type: "string", maxLength: 30 } }, required: ["city"] },
    },
  };
  const question = [{ role: "user", content: "What is the weather in Paris?" }];
  const [out] = await worker.chat(llm, question, {
    sampling_params: { max_tokens: 40, temperature: 0 }, tools: [weather],
    tool_choice: { type: "function", function: { name: "get_weather" } },
  });
  const [call] = out.outputs[0].tool_calls ?? [];
  assert.ok(call.id.startsWith("call_"));
  assert.equal(call.function.name, "get_weather");
  const args = JSON.parse(call.function.arguments);
  assert.equal(typeof args.city, "string");
  const [reply] = await worker.chat(llm, [...question,
    { role: "assistant", content: null, tool_calls: [call] },
    { role: "tool", tool_call_id: call.id, content: "18 C and sunny" }],
  { sampling_params: { max_tokens: 8, temperature: 0 }, tools: [weather] });
  assert.ok(reply.outputs[0].text.length > 0);
  const bad = await expectError(worker.chat(llm, question,
    { tools: [weather], tool_choice: { type: "function", function: { name: "nope" } } }), "invalid_params");
  assert.equal(bad.details.field, "tool_choice");
});

test("tokenize and detokenize round-trip", async () => {
  const ids = await worker.tokenize(llm, "Hello world", { add_special_tokens: false });
  assert.ok(ids.length >= 2);
  assert.equal(await worker.detokenize(llm, ids), "Hello world");
});

test("embed returns one typed vector per input, and bad input names the field", async () => {
  const minilm = await worker.llm("all-MiniLM-L6-v2", { device: "cpu" });
  const texts = ["A cat sits on the mat.", "Stocks fell sharply.", "The kitten rests on the rug."];
  const result: EmbedResult = await worker.embed(minilm, texts);
  assert.deepEqual(result.data.map((d) => d.index), [0, 1, 2]);
  const [cat, stocks, kitten] = result.data.map((d) => d.embedding);
  assert.equal(cat.length, 384);
  const dot = (a: number[], b: number[]) => a.reduce((sum, v, i) => sum + v * b[i], 0);
  assert.ok(Math.abs(dot(cat, cat) - 1) < 1e-5); // normalized
  assert.ok(dot(cat, kitten) > dot(cat, stocks)); // the paraphrase is nearer
  assert.equal(result.usage.total_tokens, result.data.reduce((sum, d) => sum + d.prompt_tokens, 0));
  const short = await worker.embed(minilm, "x", { pooling: "cls", dimensions: 8 });
  assert.equal(short.data[0].embedding.length, 8);
  const empty = await expectError(worker.embed(minilm, []), "invalid_params");
  assert.equal(empty.details.field, "input");
  const pooling = await expectError(worker.embed(minilm, "x", { pooling: "max" }), "invalid_params");
  assert.equal(pooling.details.field, "pooling");
  const wide = await expectError(worker.embed(minilm, "x", { dimensions: 385 }), "invalid_params");
  assert.equal(wide.details.field, "dimensions");
  await worker.release(minilm);
});

test("invalid options fail locally, naming the field", async () => {
  const error = await expectError(worker.generate(llm, "x", { sampling_params: { temperature: -1 } }),
    "invalid_params");
  assert.equal(error.details.field, "sampling_params.temperature");
  await expectError(worker.generate(llm, "x", { sampling_params: { nope: 1 } as never }), "invalid_params");
  // an open lower bound (exclusive_min): top_p=0 fails here, worded by the client, not by the worker
  const open = await expectError(worker.generate(llm, "x", { sampling_params: { top_p: 0 } }), "invalid_params");
  assert.equal(open.details.field, "sampling_params.top_p");
  assert.equal(open.message, "sampling_params.top_p: must be > 0, got 0");
  // and the worker's own validation reaches the caller the same way
  await expectError(worker.generate("llm-404", "x"), "not_found");
  await expectError(worker.ping({ timeoutProfile: "no_such_profile" }), "invalid_request");
});

test("large frames go through the pipe with backpressure, in both directions", async () => {
  // 6 x 4 MiB requests at once: far more than the pipe holds, so writes wait for 'drain'
  const blob = new Uint8Array(4 << 20).fill(7);
  const answers = await Promise.all(Array.from({ length: 6 }, () =>
    worker.call("ping", { blob }).then(() => "ok", (e: LMPortError) => e.code)));
  assert.deepEqual(answers, Array(6).fill("invalid_params")); // ping has no `blob`: answered, not choked on
  const text = "lorem ipsum ".repeat(40_000); // ~480 KB of text back from the worker
  const ids = await worker.tokenize(llm, text, { add_special_tokens: false });
  assert.equal(await worker.detokenize(llm, ids), text);
});

test("streaming yields deltas in order, then the summary", async () => {
  const stream = worker.generateStream(llm, "Once upon a time", { sampling_params: { max_tokens: 6, temperature: 0 } });
  const texts: string[] = [];
  for await (const delta of stream) texts.push(delta.outputs[0].text);
  assert.equal(texts.length, 6);
  const summary = await stream.summary;
  assert.equal(summary.usage.completion_tokens, 6);
});

test("results are typed: RequestOutput, Chunk and Summary fields read without casts", async () => {
  const greedy = { max_tokens: 4, ignore_eos: true, temperature: 0 };
  const [out]: RequestOutput[] = await worker.generate(llm, "The sea", { sampling_params: greedy });
  assert.equal(out.prompt, "The sea");
  const first: CompletionOutput = out.outputs[0];
  const reason: string | null = first.finish_reason;
  assert.equal(reason, "length");
  assert.equal(first.token_ids.length, 4);
  assert.equal(first.logprobs, null); // not asked for
  const metrics: RequestMetrics = out.metrics;
  assert.equal(metrics.num_prompt_tokens, out.prompt_token_ids.length);
  assert.equal(metrics.num_generation_tokens, 4);

  const stream = worker.generateStream(llm, "The sea", { sampling_params: { ...greedy, logprobs: 1 } });
  let generated = 0;
  for await (const chunk of stream) {
    assert.equal(chunk.index, 0);
    const delta: ChunkOutput = chunk.outputs[0];
    generated += delta.token_ids.length;
    for (const position of delta.logprobs ?? assert.fail("logprobs were asked for")) {
      assert.ok(position.length >= 1);
      assert.equal(typeof position[0].logprob, "number");
    }
  }
  const summary: Summary = await stream.summary;
  const usage: Usage = summary.usage;
  assert.equal(usage.completion_tokens, 4);
  assert.equal(generated, 4);
  assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
  assert.equal(summary.requests[0].outputs[0].finish_reason, "length");
  assert.equal(summary.requests[0].metrics.num_prompt_tokens, metrics.num_prompt_tokens);
});

test("breaking out of a stream cancels the request in the worker", async () => {
  const before = (await engineStats()).requests_aborted;
  let seen = 0;
  const stream = worker.generateStream(llm, "Count:", { sampling_params: LONG });
  for await (const delta of stream) {
    assert.ok(delta.outputs);
    if (++seen === 2) break;
  }
  await expectError(stream.summary, "cancelled");
  assert.ok(await waitFor(async () => (await engineStats()).requests_aborted > before, 10_000));
});

test("32 concurrent calls are batched by the engine", async () => {
  const outs = await Promise.all(Array.from({ length: 32 }, (_, i) =>
    worker.generate(llm, `Story ${i}:`, { sampling_params: { max_tokens: 8, ignore_eos: true, temperature: 0 } })));
  assert.equal(outs.length, 32);
  for (const [out] of outs) assert.equal(out.outputs[0].token_ids.length, 8);
  assert.ok((await engineStats()).max_num_running > 1);
});

test("an AbortSignal cancels the request in the worker", async () => {
  const before = (await engineStats()).requests_aborted;
  const controller = new AbortController();
  const call = worker.generate(llm, "Abort me:", { sampling_params: LONG, signal: controller.signal });
  setTimeout(() => controller.abort(), 300);
  await expectError(call, "cancelled");
  assert.ok(await waitFor(async () => (await engineStats()).requests_aborted > before, 10_000));
  await expectError(worker.ping({ signal: AbortSignal.abort() }), "cancelled"); // aborted before sending
});

test("timeout ends a long generation with deadline_exceeded; the worker keeps serving", async () => {
  const started = Date.now();
  const error = await expectError(worker.generate(llm, "Slow:", { sampling_params: LONG, timeout: 300 }),
    "deadline_exceeded");
  assert.ok(Date.now() - started < 5_000, "answered by the worker's deadline, not the client's grace");
  assert.notEqual(error.details.client_side, true);
  const outs = await worker.generate(llm, "Still here", { sampling_params: { max_tokens: 2 } });
  assert.equal(outs.length, 1);
});

test("a worker killed with SIGKILL fails every pending call", async () => {
  const doomed = await Worker.spawn(SPAWN);
  const events: string[] = [];
  doomed.onEvent((name) => events.push(name));
  try {
    const handle = await doomed.llm("smollm2", ENGINE);
    assert.ok(events.includes("model_loaded"), `events: ${events.join(", ")}`);
    const pending = [1, 2, 3].map((i) => doomed.generate(handle, `Call ${i}:`, { sampling_params: LONG }));
    await new Promise((r) => setTimeout(r, 300));
    process.kill(doomed.pid, "SIGKILL");
    for (const call of pending) {
      const error = await expectError(call, "worker_exited");
      assert.equal(error.details.signal, "SIGKILL");
    }
    await expectError(doomed.ping(), "worker_exited");
  } finally {
    await doomed.close();
  }
  assert.ok(await waitFor(() => !groupAlive(doomed.pgid), 5_000));
});

test("a wedged worker is detected by the client's deadline and killed", async () => {
  const wedged = await Worker.spawn({ ...SPAWN, grace: 500 });
  process.kill(wedged.pid, "SIGSTOP");
  const error = await expectError(wedged.ping({ timeout: 200 }), "deadline_exceeded");
  assert.equal(error.details.client_side, true);
  await wedged.exited; // the ping probe went unanswered: the group was killed
  assert.ok(!groupAlive(wedged.pgid));
  await expectError(wedged.ping(), "worker_exited");
  await wedged.close();
});

test("close leaves no process behind; later calls fail with shutting_down", async () => {
  const other = await Worker.spawn(SPAWN);
  const pgid = other.pgid;
  assert.ok(groupAlive(pgid));
  const pending = other.generate("llm-1", "x").catch((e: unknown) => e);
  await other.close();
  assert.ok(!groupAlive(pgid), "the worker's process group is gone");
  const error = await pending;
  assert.ok(error instanceof LMPortError);
  await expectError(other.ping(), "shutting_down");
  await other.close(); // idempotent
});

/** Runs a Node host that starts a worker and prints its pgid; returns the host process and that pgid. */
async function startHost(body: string): Promise<{ host: ChildProcess; pgid: number }> {
  const index = new URL("../src/index.js", import.meta.url).href;
  const host = spawn(process.execPath, ["--input-type=module", "-e", `
    import { Worker } from ${JSON.stringify(index)};
    const w = await Worker.spawn({ stderr: "ignore" });
    await w.ping();
    console.log(w.pgid);
    ${body}`], { stdio: ["ignore", "pipe", "inherit"] });
  const line = await new Promise<string>((resolve, reject) => {
    host.stdout!.once("data", (d: Buffer) => resolve(d.toString()));
    host.once("exit", (code) => reject(new Error(`host exited early (${code})`)));
  });
  return { host, pgid: Number(line.trim()) };
}

test("an idle worker does not keep Node alive, and exits with its host", async () => {
  const { host, pgid } = await startHost("");
  assert.ok(await waitFor(() => host.exitCode !== null, 15_000), "the host exited on its own");
  assert.equal(host.exitCode, 0);
  assert.ok(await waitFor(() => !groupAlive(pgid), 10_000), "the worker followed it");
});

test("no worker outlives a host killed with SIGKILL", async () => {
  const { host, pgid } = await startHost("setInterval(() => {}, 1000);");
  assert.ok(groupAlive(pgid));
  host.kill("SIGKILL");
  assert.ok(await waitFor(() => !groupAlive(pgid), 10_000), "the worker noticed its parent died");
});
