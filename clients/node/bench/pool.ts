// Throughput of a pool of 2 workers against a pool of 1, alternating A B A B in one run so both see the same
// machine load. Each worker of the 2-worker pool gets `--threads` torch threads (OMP_NUM_THREADS, default 1); the
// single worker gets `--single-threads` (default: the same), so both sides can be given the same cores in all.
//   npm run bench:pool -- [--requests 8] [--tokens 32] [--rounds 2] [--threads 1] [--single-threads 1]
import { parseArgs } from "node:util";
import { Pool, type HandleMap } from "../src/index.js";

const { values } = parseArgs({
  options: {
    requests: { type: "string", default: "8" }, tokens: { type: "string", default: "32" },
    rounds: { type: "string", default: "2" }, threads: { type: "string", default: "1" },
    "single-threads": { type: "string" },
  },
});
const requests = Number(values.requests);
const tokens = Number(values.tokens);
const rounds = Number(values.rounds);
const threads = [values["single-threads"] ?? values.threads, values.threads];
const ENGINE = { dtype: "float32", max_model_len: 256, kv_cache_memory_bytes: 64 << 20 } as const;
const SAMPLING = { max_tokens: tokens, ignore_eos: true, temperature: 0 };

/** Generated tokens per second for `requests` concurrent single-prompt calls. */
async function tokensPerSecond(pool: Pool, llm: HandleMap): Promise<number> {
  const start = performance.now();
  const outs = await Promise.all(Array.from({ length: requests }, (_, i) =>
    pool.generate(llm, `Request ${i}: once upon a time`, { sampling_params: SAMPLING })));
  const seconds = (performance.now() - start) / 1000;
  return outs.reduce((sum, out) => sum + out[0]!.outputs[0]!.token_ids.length, 0) / seconds;
}

const pools = await Promise.all([1, 2].map((size, i) =>
  Pool.spawn({ size, stderr: "ignore", env: { ...process.env, OMP_NUM_THREADS: threads[i] } })));
try {
  const handles = await Promise.all(pools.map((pool) => pool.llm("smollm2", ENGINE)));
  await Promise.all(pools.map((pool, i) => tokensPerSecond(pool, handles[i]!))); // warm-up
  const rates: number[][] = [[], []];
  for (let round = 0; round < rounds; round++) {
    for (const i of [0, 1]) rates[i]!.push(await tokensPerSecond(pools[i]!, handles[i]!));
  }
  const mean = (xs: number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
  const [one, two] = rates.map(mean) as [number, number];
  console.log(JSON.stringify({ requests, tokens, rounds, threads_1_worker: Number(threads[0]), threads_per_worker_2: Number(threads[1]),
    tok_s_1_worker: rates[0]!.map((r) => +r.toFixed(1)), tok_s_2_workers: rates[1]!.map((r) => +r.toFixed(1)),
    ratio_2_over_1: +(two / one).toFixed(2) }));
} finally {
  await Promise.all(pools.map((pool) => pool.close()));
}
