// Pool of real workers (`python -m lmport.bridge.worker`) on the bundled model. One pool of 3 serves the tests in
// order: handle on every worker, then a worker killed under load and restarted.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { LMPortError, Pool, type HandleMap, type SpawnOptions, type Worker } from "../src/index.js";
import { waitFor } from "./helpers.js";

const ENGINE = { dtype: "float32", max_model_len: 256, kv_cache_memory_bytes: 32 << 20 } as const;
const SPAWN: SpawnOptions = { stderr: "ignore", env: { ...process.env, OMP_NUM_THREADS: "1" } };
const PROMPT = "The capital of France is";
const SHORT = { max_tokens: 4, temperature: 0 };

let pool: Pool;
let llm: HandleMap;

before(async () => {
  pool = await Pool.spawn({ ...SPAWN, size: 3, restartDelay: 100 });
  llm = await pool.llm("smollm2", ENGINE);
});

after(async () => {
  await pool?.close();
});

/** Requests each worker has answered so far (the service counter), by place. */
async function requestsPerWorker(): Promise<number[]> {
  return Promise.all(pool.workers.map(async (w) => ((await w!.stats()).service.requests_total as number)));
}

/** One greedy generation per worker at once: least-loaded routing gives each worker one of them. */
async function onePerWorker(): Promise<string[]> {
  const outs = await Promise.all(pool.workers.map(() => pool.generate(llm, PROMPT, { sampling_params: SHORT })));
  return outs.map((out) => out[0]!.outputs[0]!.text);
}

test("the pool-wide handle works on every worker", async () => {
  assert.match(llm.ref, /^pool-llm-/);
  const before = await requestsPerWorker();
  const texts = await onePerWorker();
  const afterCalls = await requestsPerWorker();
  // each worker answered the generate (and this test's first stats call): the handle resolved on all three
  assert.deepEqual(afterCalls.map((n, i) => n - before[i]!), [2, 2, 2]);
  assert.equal(new Set(texts).size, 1, `greedy outputs differ across workers: ${JSON.stringify(texts)}`);
  const tokens = await pool.tokenize(llm, "Paris");
  assert.ok(tokens.length > 0 && tokens.every(Number.isInteger));
});

test("a worker-local or unknown ref is refused, naming the field", async () => {
  const error = await pool.generate("llm-1", PROMPT).then(() => assert.fail("accepted"), (e: unknown) => e);
  assert.ok(error instanceof LMPortError);
  assert.equal(error.code, "not_found");
  assert.equal(error.details.field, "llm");
});

test("killing one of 3 workers under load: started calls fail with worker_exited, the rest are served", async () => {
  const victim = pool.workers[1]!;
  const busy = { max_tokens: 48, ignore_eos: true, temperature: 0 };
  const streams = Array.from({ length: 6 }, () => pool.generateStream(llm, PROMPT, { sampling_params: busy }));
  // two per worker; wait until every one has produced a chunk (it had started)
  const firsts = await Promise.all(streams.map((s) => s.next()));
  assert.ok(firsts.every((r) => r.done === false));
  const settled = Promise.allSettled(streams.map(async (s) => {
    for await (const _ of s) { /* drain */ }
    return s.summary;
  }));
  process.kill(-victim.pgid, "SIGKILL");
  // calls made while the worker is down (dead, then restarting) had not started anywhere: none may be lost
  await waitFor(() => pool.workers[1] !== victim, 10_000);
  const later = Array.from({ length: 6 }, () => pool.generate(llm, PROMPT, { sampling_params: SHORT }));
  const outcomes = await settled;
  const failed = outcomes.filter((o): o is PromiseRejectedResult => o.status === "rejected");
  assert.equal(failed.length, 2, `expected the victim's 2 streams to fail, got ${failed.length}`);
  for (const { reason } of failed) {
    assert.ok(reason instanceof LMPortError);
    assert.equal(reason.code, "worker_exited", reason.message);
    assert.equal(reason.details.started, true); // they had delivered chunks: never replayed
  }
  for (const outs of await Promise.all(later)) assert.equal(outs[0]!.outputs[0]!.token_ids.length, 4);
});

test("the crashed worker is restarted and serves the pool-wide handle", async () => {
  const ready = (w: Worker | undefined): boolean => w?.ready === true;
  assert.ok(await waitFor(() => pool.workers.every(ready), 120_000), "worker 1 was not restarted");
  assert.equal(pool.restarts, 1);
  const before = await requestsPerWorker();
  const texts = await onePerWorker(); // the restarted worker loads the handle's model lazily
  const afterCalls = await requestsPerWorker();
  assert.ok(afterCalls[1]! - before[1]! >= 2, "the restarted worker served no call");
  assert.equal(new Set(texts).size, 1);
});

test("a worker killed while it loads the handle for a call: the call is served by another worker", async () => {
  const ready = (w: Worker | undefined): boolean => w?.ready === true;
  const idle = pool.workers[2]!;
  process.kill(-idle.pgid, "SIGKILL");
  assert.ok(await waitFor(() => pool.workers[2] !== idle && pool.workers.every(ready), 120_000));
  const fresh = pool.workers[2]!; // has not loaded the handle's model yet
  let loaded = false;
  fresh.onEvent((name) => { if (name === "model_loaded") loaded = true; });
  const calls = pool.workers.map(() => pool.generate(llm, PROMPT, { sampling_params: SHORT }));
  await new Promise((r) => setTimeout(r, 200)); // one call now waits for the fresh worker's load
  assert.equal(loaded, false, "the load finished before the kill: the test proves nothing");
  process.kill(-fresh.pgid, "SIGKILL");
  for (const outs of await Promise.all(calls)) assert.equal(outs[0]!.outputs[0]!.token_ids.length, 4);
});

test("release frees the handle on every worker", async () => {
  const extra = await pool.llm("smollm2", ENGINE);
  await pool.generate(extra, PROMPT, { sampling_params: SHORT });
  const released = await pool.release(extra);
  assert.equal(released.ref, extra.ref);
  const error = await pool.generate(extra, PROMPT).then(() => assert.fail("accepted"), (e: unknown) => e);
  assert.ok(error instanceof LMPortError);
  assert.equal(error.code, "not_found");
});
