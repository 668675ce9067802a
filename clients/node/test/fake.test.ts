// Protocol edge cases against a scripted stand-in for the worker (test/helpers.ts fakeWorker): fast, no model.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Pool, Worker } from "../src/index.js";
import { fakeWorker, groupAlive, runHost, waitFor } from "./helpers.js";

test("a throwing event listener is the host's bug: it surfaces as uncaught, the worker keeps serving", async () => {
  const fake = fakeWorker(`
hello()
request = recv()
send(type="event", name="model_loaded", data={})
respond(request, {"n": 1})
recv()  # shutdown
`);
  const { code, stdout } = await runHost(`
    const uncaught = [];
    process.on("uncaughtException", (e) => uncaught.push(e.message));
    const w = await Worker.spawn({ python: ${JSON.stringify(fake)}, stderr: "ignore" });
    const seen = [];
    w.onEvent(() => { throw new Error("listener bug"); });
    w.onEvent((name) => seen.push(name));
    const pong = await w.ping().catch((e) => e.code);
    await new Promise((r) => setTimeout(r, 20));
    console.log(JSON.stringify({ pong, seen, uncaught }));
    await w.close();`);
  assert.equal(code, 0);
  assert.deepEqual(JSON.parse(stdout), { pong: { n: 1 }, seen: ["model_loaded"], uncaught: ["listener bug"] });
});

test("a timeout beyond setTimeout's range is a long deadline, not a 1 ms one", async () => {
  const fake = fakeWorker(`
hello()
request = recv()
time.sleep(0.2)
respond(request, {"timeout_ms": request["timeout_ms"]})
recv()
`);
  const worker = await Worker.spawn({ python: fake, stderr: "ignore" });
  try {
    assert.deepEqual(await worker.ping({ timeout: 2 ** 31 + 5 }), { timeout_ms: 2 ** 31 + 5 });
  } finally {
    await worker.close();
  }
});

test("a raw call's client-side deadline follows the method's own profile, as the worker's does", async () => {
  // the worker would give generate its ml_inference deadline (10 s); "default" (100 ms) + grace is too short
  const fake = fakeWorker(`
hello(timeout_profiles={"default": 100, "streaming": 10000, "ml_inference": 10000, "batch_job": 10000})
request = recv()
time.sleep(0.6)
respond(request, {"method": request["method"]})
recv()
`);
  const worker = await Worker.spawn({ python: fake, stderr: "ignore", grace: 100 });
  try {
    assert.deepEqual(await worker.call("generate", {}), { method: "generate" });
  } finally {
    await worker.close();
  }
});

test("client-only codes (docs/protocol.md): protocol_mismatch, and protocol_error for an unreadable frame", async () => {
  await assert.rejects(Worker.spawn({ python: fakeWorker("hello(protocol=2)\nrecv()"), stderr: "ignore" }),
    { code: "protocol_mismatch" });
  const worker = await Worker.spawn({ python: fakeWorker(`
hello()
recv()
send_raw(b"\\xc1")
time.sleep(60)
`), stderr: "ignore" });
  await assert.rejects(worker.ping(), { code: "protocol_error" });
  await worker.close();
  assert.ok(!groupAlive(worker.pgid)); // it was killed
});

test("a stream chunk out of order ends the stream with protocol_error and cancels the request", async () => {
  const worker = await Worker.spawn({ python: fakeWorker(`
hello()
request = recv()
send(type="chunk", id=request["id"], seq=0, data={"n": 0})
send(type="chunk", id=request["id"], seq=2, data={"n": 2})
cancel = recv()
ping = recv()
respond(ping, {"cancelled": cancel == {"type": "cancel", "id": request["id"]}})
recv()
`), stderr: "ignore" });
  try {
    const seen: unknown[] = [];
    await assert.rejects(async () => {
      for await (const chunk of worker.stream<{ n: number }>("generate")) seen.push(chunk.n);
    }, { code: "protocol_error", message: "stream chunk seq 2, expected 1" });
    assert.deepEqual(seen, [0]);
    assert.deepEqual(await worker.ping(), { cancelled: true });
  } finally {
    await worker.close();
  }
});

/** Two fake workers in a pool; the first to start answers every request with `error`, the other with its pid. */
async function poolWithARefuser(error: Record<string, unknown>): Promise<{ pool: Pool; refused: () => string[] }> {
  const lock = join(mkdtempSync(join(tmpdir(), "lmport-pool-")), "lock");
  const fake = fakeWorker(`import json
refuse_if_first(${JSON.stringify(lock)}, json.loads(${JSON.stringify(JSON.stringify(error))}))`);
  const pool = await Pool.spawn({ size: 2, python: fake, stderr: "ignore", grace: 300 });
  return { pool, refused: () => readFileSync(lock, "utf8").split("\n").filter(Boolean) };
}

test("pool: a call answered overloaded is retried on the other worker", async () => {
  const { pool, refused } = await poolWithARefuser({ code: "overloaded", message: "full", retryable: true });
  try {
    // one call per worker: the one that met the refuser is served by the other
    const answers = await Promise.all([pool.ping(), pool.ping()]);
    assert.deepEqual(refused(), ["ping"]);
    assert.equal(answers[0]!.pid, answers[1]!.pid);
  } finally {
    await pool.close();
  }
});

test("pool: shutting_down after engine work (details.usage) is not retried", async () => {
  const usage = { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 };
  const { pool, refused } = await poolWithARefuser({ code: "shutting_down", message: "stopping", retryable: true,
    details: { usage } });
  try {
    const outcomes = await Promise.allSettled([pool.ping(), pool.ping()]);
    const failed = outcomes.filter((o): o is PromiseRejectedResult => o.status === "rejected");
    assert.equal(failed.length, 1);
    assert.equal(failed[0]!.reason.code, "shutting_down");
    assert.deepEqual(refused(), ["ping"]); // answered once, never sent again
  } finally {
    await pool.close();
  }
});

test("pool: a call waiting for a restarting worker can be aborted", { timeout: 20_000 }, async () => {
  const fake = fakeWorker(`hello()
sys.exit(0)  # gone right after its hello: the pool's only worker is down until its restart
`);
  const pool = await Pool.spawn({ size: 1, python: fake, stderr: "ignore", restartDelay: 60_000 });
  try {
    await waitFor(() => pool.workers[0] === undefined, 5_000);
    const controller = new AbortController();
    const call = pool.ping({ signal: controller.signal });
    setTimeout(() => controller.abort(), 100);
    await assert.rejects(call, (e: { code?: string }) => e.code === "cancelled");
  } finally {
    await pool.close();
  }
});
