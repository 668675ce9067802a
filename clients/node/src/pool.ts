/**
 * Several workers behind one API. Calls go to the ready worker with the fewest calls in flight; a call the worker
 * never admitted (`overloaded`, or `shutting_down` before any engine work) is retried on another worker, while one
 * that had started fails with its own code and is never replayed. A worker that exits is restarted while the
 * others keep serving. Handles from `llm` belong to the pool: each worker loads the model behind a handle once and
 * the pool maps the handle to that worker's own ref.
 */

import { LMPortError } from "./errors.js";
import { Methods, type HandleMap } from "./generated/api.js";
import { RequestStream } from "./stream.js";
import { Worker, prepareCall, type CallOptions, type MethodSpec, type SpawnOptions } from "./transport.js";

export interface PoolOptions extends SpawnOptions {
  /** Number of workers. Default 2. */
  size?: number;
  /** Start a new worker when one exits unexpectedly. Default true. */
  restart?: boolean;
  /** Milliseconds before restarting a worker; doubles after each failed start, up to 30 s. Default 500. */
  restartDelay?: number;
}

const MAX_RESTART_DELAY_MS = 30_000;

/** What an `llm` call on the pool asked for, so every worker can load the same engine. */
interface PoolHandle {
  readonly params: Record<string, unknown>;
}

/** One place in the pool: the worker living there now (replaced after a crash) and its share of the load. */
class Slot {
  worker: Worker | undefined;
  inflight = 0;
  /** Pool handle ref -> this worker's ref (a promise while it loads). Cleared when the worker is replaced. */
  readonly refs = new Map<string, Promise<string>>();
  restartDelay: number;

  constructor(readonly index: number, restartDelay: number) {
    this.restartDelay = restartDelay;
  }

  get ready(): boolean {
    return this.worker?.ready === true;
  }
}

export class Pool extends Methods {
  /** Workers restarted after an unexpected exit, since the pool started. */
  restarts = 0;
  readonly #options: SpawnOptions;
  readonly #restart: boolean;
  readonly #baseDelay: number;
  readonly #slots: Slot[];
  readonly #handles = new Map<string, PoolHandle>();
  readonly #readyWaiters: (() => void)[] = [];
  readonly #timers = new Set<NodeJS.Timeout>();
  #nextHandle = 1;
  #nextSlot = 0; // where the least-loaded search starts, so ties rotate
  #closed = false;

  /** Starts `size` workers in parallel and resolves once all sent their hello; if one cannot start, none stay. */
  static async spawn(options: PoolOptions = {}): Promise<Pool> {
    const { size = 2, restart = true, restartDelay = 500, ...spawnOptions } = options;
    if (!Number.isInteger(size) || size < 1) {
      throw new LMPortError("invalid_params", `size must be an integer >= 1, got ${String(size)}`,
        { field: "size" });
    }
    const pool = new Pool(size, spawnOptions, restart, restartDelay);
    const started = await Promise.allSettled(pool.#slots.map((slot) => pool.#start(slot)));
    const failure = started.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failure) {
      await pool.close();
      throw failure.reason;
    }
    return pool;
  }

  private constructor(size: number, options: SpawnOptions, restart: boolean, restartDelay: number) {
    super();
    this.#options = options;
    this.#restart = restart;
    this.#baseDelay = restartDelay;
    this.#slots = Array.from({ length: size }, (_, i) => new Slot(i, restartDelay));
  }

  /** Number of worker places (a crashed one counts while it restarts). */
  get size(): number {
    return this.#slots.length;
  }

  /** The workers running now, by place; `undefined` where one is restarting. */
  get workers(): (Worker | undefined)[] {
    return this.#slots.map((slot) => slot.worker);
  }

  /** Stops every worker (see `Worker.close`); calls still pending fail, new ones fail with `shutting_down`. */
  async close(): Promise<void> {
    this.#closed = true;
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    for (const wake of this.#readyWaiters.splice(0)) wake();
    await Promise.all(this.#slots.map((slot) => slot.worker?.close()));
  }

  protected override invoke<R>(spec: MethodSpec, args: Record<string, unknown>, options?: object): Promise<R> {
    let params: Record<string, unknown>;
    let callOptions: CallOptions;
    try {
      [params, callOptions] = prepareCall(spec, args, options);
    } catch (error) {
      return Promise.reject(error);
    }
    if (spec.name === "llm") return this.#llm(params, callOptions) as Promise<R>;
    if (spec.name === "release") return this.#release(params, callOptions) as Promise<R>;
    return this.#route(spec, params, callOptions.signal, (worker, workerParams) =>
      worker.call<R>(spec.name, workerParams, callOptions, spec.profile));
  }

  protected override invokeStream<T, S>(spec: MethodSpec, args: Record<string, unknown>,
                                        options?: object): RequestStream<T, S> {
    const [params, callOptions] = prepareCall(spec, args, options);
    let inner: RequestStream<T, S> | undefined;
    let stopped = false;
    const outer = new RequestStream<T, S>(() => {
      stopped = true;
      inner?.cancel();
    });
    let seq = 0;
    void this.#route(spec, params, callOptions.signal, async (worker, workerParams) => {
      if (stopped) throw new LMPortError("cancelled", `${spec.name} cancelled before it was sent`);
      inner = worker.stream<T, S>(spec.name, workerParams, callOptions);
      try {
        for await (const chunk of inner) outer.push(seq++, chunk);
        return await inner.summary;
      } catch (error) {
        // chunks already reached the caller: the generation must not be replayed on another worker
        throw seq > 0 ? started(error) : error;
      }
    }).then((summary) => outer.end(summary), (error) => outer.fail(error));
    return outer;
  }

  /**
   * Runs `send` on the least-loaded ready worker, with the call's handles mapped to that worker's refs; retries
   * elsewhere while the failure says the call was never admitted. Each worker is tried at most once.
   */
  async #route<R>(spec: MethodSpec, params: Record<string, unknown>, signal: AbortSignal | undefined,
                  send: (worker: Worker, params: Record<string, unknown>) => Promise<R>): Promise<R> {
    const tried = new Set<Worker>();
    let lastError: unknown;
    for (;;) {
      const slot = await this.#pick(tried, lastError, signal);
      const worker = slot.worker!;
      tried.add(worker);
      try {
        let workerParams: Record<string, unknown>;
        try {
          workerParams = await this.#localize(slot, worker, spec, params);
        } catch (error) {
          if (worker.ready && !notAdmitted(error)) throw error; // a bad handle, or a load the worker refused
          lastError = error; // the worker went away while loading the handle: the call was never sent
          continue;
        }
        if (slot.worker !== worker || !worker.ready) { // it died just after the load: nothing was sent
          lastError = new LMPortError("worker_exited", `worker ${slot.index} exited before ${spec.name} was sent`);
          continue;
        }
        return await send(worker, workerParams);
      } catch (error) {
        if (!notAdmitted(error)) throw error;
        lastError = error;
      } finally {
        slot.inflight--;
      }
    }
  }

  /**
   * The ready worker with the fewest calls in flight, not yet tried for this call, with the call counted on it
   * (the caller uncounts it); waits while every untried one is restarting. Throws `lastError` (or
   * `shutting_down`) when no worker is left to try.
   */
  async #pick(tried: Set<Worker>, lastError: unknown, signal: AbortSignal | undefined): Promise<Slot> {
    for (;;) {
      if (this.#closed) throw new LMPortError("shutting_down", "the pool is closed", {}, true);
      let best: Slot | undefined;
      const n = this.#slots.length;
      for (let k = 0; k < n; k++) {
        const slot = this.#slots[(this.#nextSlot + k) % n]!;
        if (slot.ready && !tried.has(slot.worker!) && (best === undefined || slot.inflight < best.inflight)) {
          best = slot;
        }
      }
      if (best) {
        this.#nextSlot = (best.index + 1) % n;
        best.inflight++;
        return best;
      }
      const restarting = this.#restart && this.#slots.some((slot) => !slot.ready);
      if (!restarting) {
        throw lastError ?? new LMPortError("shutting_down", "no worker of the pool is running", {}, true);
      }
      await this.#nextChange(signal);
    }
  }

  /** Resolves when a worker comes or goes; rejects with `cancelled` when `signal` aborts first. */
  #nextChange(signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const onAbort = (): void => reject(new LMPortError("cancelled", "aborted while waiting for a worker",
        { reason: String(signal?.reason) }));
      if (signal?.aborted) return onAbort();
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#readyWaiters.push(() => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      });
    });
  }

  /** `params` with every pool handle replaced by `worker`'s ref for it, loading the model there first if needed. */
  async #localize(slot: Slot, worker: Worker, spec: MethodSpec,
                  params: Record<string, unknown>): Promise<Record<string, unknown>> {
    const out = { ...params };
    for (const field of spec.params) {
      const value = params[field.name];
      if (!field.type?.split("|").includes("handle") || value === undefined || value === null) continue;
      out[field.name] = await this.#workerRef(slot, worker, this.#handleRef(value, field.name));
    }
    return out;
  }

  #handleRef(value: unknown, field: string): string {
    const ref = typeof value === "string" ? value : (value as HandleMap).ref;
    if (!this.#handles.has(ref)) {
      throw new LMPortError("not_found", `${field}: ${String(ref)} is not a handle of this pool (use pool.llm)`,
        { field });
    }
    return ref;
  }

  #workerRef(slot: Slot, worker: Worker, poolRef: string): Promise<string> {
    let ref = slot.refs.get(poolRef);
    if (ref === undefined) {
      ref = worker.call<HandleMap>("llm", this.#handles.get(poolRef)!.params).then((handle) => handle.ref);
      slot.refs.set(poolRef, ref);
      ref.catch(() => { if (slot.refs.get(poolRef) === ref) slot.refs.delete(poolRef); });
    }
    return ref;
  }

  /** Loads the model on every running worker; the handle it returns is the first worker's, with the pool's ref. */
  async #llm(params: Record<string, unknown>, options: CallOptions): Promise<HandleMap> {
    const poolRef = `pool-llm-${this.#nextHandle++}`;
    this.#handles.set(poolRef, { params });
    const running = this.#slots.filter((slot) => slot.ready);
    const loads = running.map((slot) => {
      const ref = slot.worker!.call<HandleMap>("llm", params, options);
      slot.refs.set(poolRef, ref.then((handle) => handle.ref));
      return ref;
    });
    const results = await Promise.allSettled(loads);
    running.forEach((slot, i) => { if (results[i]!.status === "rejected") slot.refs.delete(poolRef); });
    const loaded = results.find((r): r is PromiseFulfilledResult<HandleMap> => r.status === "fulfilled");
    if (loaded) return { ...loaded.value, ref: poolRef };
    this.#handles.delete(poolRef);
    const reasons = results.map((r) => (r as PromiseRejectedResult).reason);
    // a worker that died mid-load says nothing about the parameters: prefer another worker's answer
    throw reasons.find((e) => !(e instanceof LMPortError && e.code === "worker_exited")) ?? reasons[0]
      ?? new LMPortError("shutting_down", "no worker of the pool is running", {}, true);
  }

  /** Releases a pool handle on every worker that loaded it. */
  async #release(params: Record<string, unknown>, options: CallOptions): Promise<Record<string, unknown>> {
    const poolRef = this.#handleRef(params.ref, "ref");
    this.#handles.delete(poolRef);
    const releases = this.#slots.flatMap((slot) => {
      const ref = slot.refs.get(poolRef);
      const worker = slot.worker;
      slot.refs.delete(poolRef);
      if (ref === undefined || worker === undefined) return [];
      return [ref.then((workerRef) => worker.call<{ unloaded: boolean }>("release", { ref: workerRef }, options))];
    });
    const results = await Promise.allSettled(releases);
    const unloaded = results.some((r) => r.status === "fulfilled" && r.value.unloaded);
    return { ref: poolRef, unloaded };
  }

  /** Spawns the worker of `slot` and watches it; a later unexpected exit schedules its restart. */
  async #start(slot: Slot): Promise<void> {
    const worker = await Worker.spawn(this.#options);
    if (this.#closed) {
      await worker.close();
      return;
    }
    slot.worker = worker;
    slot.refs.clear();
    slot.restartDelay = this.#baseDelay;
    for (const wake of this.#readyWaiters.splice(0)) wake();
    void worker.exited.then(() => {
      if (slot.worker !== worker) return;
      slot.worker = undefined;
      slot.refs.clear();
      if (this.#closed) return;
      for (const wake of this.#readyWaiters.splice(0)) wake(); // callers waiting on it re-check what is left
      if (this.#restart) this.#scheduleRestart(slot);
    });
  }

  #scheduleRestart(slot: Slot): void {
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      if (this.#closed) return;
      this.#start(slot).then(() => { this.restarts++; }, () => {
        slot.restartDelay = Math.min(slot.restartDelay * 2, MAX_RESTART_DELAY_MS);
        this.#scheduleRestart(slot);
      });
    }, slot.restartDelay);
    timer.unref();
    this.#timers.add(timer);
  }
}

/**
 * A failure that proves the worker never started the call: `overloaded`, or `shutting_down` without engine usage
 * (a generation the shutdown aborted carries `details.usage` and counts as started).
 */
function notAdmitted(error: unknown): boolean {
  return error instanceof LMPortError && error.details.started !== true
    && (error.code === "overloaded" || (error.code === "shutting_down" && error.details.usage === undefined));
}

/** The same failure, marked as one that happened after the call had started (so it is not retried). */
function started(error: unknown): unknown {
  if (!(error instanceof LMPortError)) return error;
  return new LMPortError(error.code, `${error.message} (after the stream had started; not replayed)`,
    { ...error.details, started: true }, false, error.pythonType, error.traceback);
}
