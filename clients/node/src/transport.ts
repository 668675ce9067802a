/**
 * The worker process and the request multiplexer: spawn, hello, frames in and out, deadlines, cancellation,
 * shutdown. The typed method wrappers come from the generated `Methods` base class (src/generated/api.ts).
 */

import { spawn, type ChildProcess } from "node:child_process";
import type { Socket } from "node:net";
import { LMPortError, isRecord } from "./errors.js";
import { Methods } from "./generated/api.js";
import { FrameDecoder, cancelMessage, decodeBody, encodeFrame, requestMessage } from "./protocol.js";
import { findPython } from "./python.js";
import { RequestStream } from "./stream.js";
import { checkFields, type FieldSpec } from "./validate.js";

export const PROTOCOL_VERSION = 1;

export type TimeoutProfile = "default" | "streaming" | "ml_inference" | "batch_job" | (string & {});

export interface SpawnOptions {
  /** Python interpreter; default: LMPORT_PYTHON, then the nearest project `.venv/bin/python`. */
  python?: string;
  /** Extra arguments for `python -m lmport.bridge.worker` (for example `["--debug"]`). */
  args?: readonly string[];
  /** Environment of the worker (default: this process's). */
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** The worker's stderr (its logs): "inherit" (default), "ignore", or a callback receiving each chunk. */
  stderr?: "inherit" | "ignore" | ((text: string) => void);
  /** Milliseconds to wait for the worker's `hello` (the first start imports torch). Default 120000. */
  startTimeout?: number;
  /**
   * Milliseconds of grace: added to a call's deadline before the client gives up on the worker, and allowed
   * between `shutdown` and killing the process group on close. Default 5000.
   */
  grace?: number;
  /** Largest frame accepted from the worker, in bytes. Default: any (2^32 - 1). */
  maxFrameBytes?: number;
}

/** Options every call accepts, beside its own parameters. */
export interface CallOptions {
  /** Aborting the signal cancels the request in the worker and rejects the call with code `cancelled`. */
  signal?: AbortSignal;
  /**
   * Deadline in milliseconds; the worker aborts the request when it passes (`deadline_exceeded`). The client's
   * own deadline (this plus `grace`) is capped at 2^31 - 1 ms, the longest timer Node has.
   */
  timeout?: number;
  /** Named deadline from the worker's profiles; default: the method's own profile. */
  timeoutProfile?: TimeoutProfile;
}

const CALL_OPTION_KEYS: ReadonlySet<string> = new Set(["signal", "timeout", "timeoutProfile"]);

/** The worker's `hello` frame. */
export interface Hello {
  protocol: number;
  server: string;
  version: string;
  pid: number;
  pgid: number;
  max_frame_bytes: number;
  max_inflight: number;
  methods: string[];
  timeout_profiles: Record<string, number>;
  [key: string]: unknown;
}

/** What the generated wrappers know about a method (from the manifest). */
export interface MethodSpec {
  readonly name: string;
  readonly profile: TimeoutProfile;
  readonly params: readonly FieldSpec[];
}

interface Pending {
  resolve: (result: unknown) => void;
  reject: (error: unknown) => void;
  onChunk?: (seq: unknown, data: unknown) => void;
  cleanup: () => void;
}

interface Settings {
  grace: number;
  startTimeout: number;
  maxFrameBytes: number;
}

const MAX_FRAME = 0xffff_ffff; // worker -> host frames have no limit beyond the 32-bit length

/** setTimeout's longest delay (about 24.8 days); a longer one fires after 1 ms instead. */
const MAX_TIMER_MS = 0x7fff_ffff;

/**
 * A running lmport worker: one method per worker method, each returning a promise (streaming methods also have a
 * `...Stream` form). Start one with `await Worker.spawn(options)`; stop it with `close()`.
 */
export class Worker extends Methods {
  /** The hello frame: server version, pgid, limits, methods, timeout profiles. */
  hello!: Hello;
  /** Resolves when the worker process has exited and its pipes are closed. */
  readonly exited: Promise<void>;
  readonly #child: ChildProcess;
  readonly #settings: Settings;
  readonly #pending = new Map<number, Pending>();
  readonly #writeQueue: Buffer[] = [];
  readonly #eventListeners: ((name: string, data: unknown) => void)[] = [];
  #writeBlocked = false;
  #referenced = true; // a spawned child and its pipes hold the event loop until unref'd
  #nextId = 1;
  #state: "starting" | "ready" | "closing" | "exited" = "starting";
  #exitError: LMPortError | undefined;
  #closing: Promise<void> | undefined;
  #helloWaiter: Pending | undefined;
  #markExited!: () => void;

  /**
   * Starts a worker and waits for its hello. The process runs in its own process group, so `close()` can kill
   * everything it started; it keeps Node alive only while calls are in flight.
   */
  static async spawn<T extends Worker>(this: new (child: ChildProcess, settings: Settings) => T,
                                          options: SpawnOptions = {}): Promise<T> {
    const { python, projectRoot } = findPython(options.python);
    const env = { ...(options.env ?? process.env) };
    if (projectRoot !== undefined) env.PYTHONPATH = [projectRoot, env.PYTHONPATH].filter(Boolean).join(":");
    const stderr = options.stderr ?? "inherit";
    const child = spawn(python, ["-m", "lmport.bridge.worker", ...(options.args ?? [])], {
      cwd: options.cwd, env, detached: true,
      stdio: ["pipe", "pipe", typeof stderr === "function" ? "pipe" : stderr],
    });
    if (typeof stderr === "function") {
      child.stderr!.setEncoding("utf8").on("data", stderr);
    }
    const worker = new this(child, {
      grace: options.grace ?? 5_000,
      startTimeout: options.startTimeout ?? 120_000,
      maxFrameBytes: options.maxFrameBytes ?? MAX_FRAME,
    });
    await (worker as Worker).#waitForHello();
    return worker;
  }

  /** @internal — use `spawn`. */
  constructor(child: ChildProcess, settings: Settings) {
    super();
    this.#child = child;
    this.#settings = settings;
    this.exited = new Promise((resolve) => { this.#markExited = resolve; });
    const decoder = new FrameDecoder(settings.maxFrameBytes);
    child.stdout!.on("data", (chunk: Buffer) => {
      // Only reading frames is guarded: a bug in code that handles a message (an event listener) is not the
      // worker's fault and must not kill it.
      let bodies: Buffer[];
      try {
        bodies = decoder.push(chunk);
      } catch (error) {
        this.#unreadable(error);
        return;
      }
      for (const body of bodies) {
        let message: unknown;
        try {
          message = decodeBody(body);
        } catch (error) {
          this.#unreadable(error);
          return;
        }
        this.#onFrame(message);
      }
    });
    child.stdin!.on("drain", () => this.#flush());
    child.stdin!.on("error", () => undefined); // EPIPE after the worker died: the exit handler reports it
    child.on("error", (error) => {
      this.#onExit(new LMPortError("spawn_failed", `cannot start the worker: ${error.message}`));
    });
    child.on("exit", (code, signal) => {
      // 'close' normally follows once stdout is drained; don't wait forever if a grandchild holds the pipe.
      setTimeout(() => this.#onExit(exitError(code, signal)), 1_000).unref();
    });
    child.on("close", (code, signal) => this.#onExit(exitError(code, signal)));
  }

  /** True once the hello arrived and until the worker starts closing or exits: a call now is written at once. */
  get ready(): boolean {
    return this.#state === "ready";
  }

  get pid(): number {
    return this.#child.pid ?? -1;
  }

  /** Process group of the worker: spawned detached, it leads a group named after its pid. */
  get pgid(): number {
    return this.pid;
  }

  /** Listens to the worker's `event` frames (`model_loaded`, `shutting_down`, `protocol_error`, ...). */
  onEvent(listener: (name: string, data: unknown) => void): void {
    this.#eventListeners.push(listener);
  }

  /**
   * Calls any worker method by name; the generated wrappers are typed shortcuts for this. `profile` sets the
   * client-side deadline when `options` name none; by default the method's own, as the worker does.
   */
  call<R = unknown>(method: string, params: Record<string, unknown> = {}, options: CallOptions = {},
                    profile: TimeoutProfile = this.methodProfile(method)): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      this.#start(method, params, options, profile, { resolve: resolve as (r: unknown) => void, reject });
    });
  }

  /** Calls a streaming method by name; see `RequestStream`. */
  stream<T = unknown, S = unknown>(method: string, params: Record<string, unknown> = {},
                                   options: CallOptions = {}): RequestStream<T, S> {
    let cancel = (): void => undefined;
    const stream = new RequestStream<T, S>(() => cancel());
    cancel = this.#start(method, params, options, "streaming", {
      resolve: (summary) => stream.end(summary as S),
      reject: (error) => stream.fail(error),
      onChunk: (seq, data) => stream.push(seq, data as T),
    }, true);
    return stream;
  }

  /**
   * Stops the worker: `shutdown`, then up to `grace` ms for it to exit, then SIGTERM and SIGKILL to its whole
   * process group. Calls still pending fail. Safe to call more than once.
   */
  close(): Promise<void> {
    this.#closing ??= this.#shutdown();
    return this.#closing;
  }

  /** Used by the generated wrappers: splits call options from parameters, validates, sends. */
  protected override invoke<R>(spec: MethodSpec, args: Record<string, unknown>, options?: object): Promise<R> {
    try {
      const [params, callOptions] = prepareCall(spec, args, options);
      return this.call<R>(spec.name, params, callOptions, spec.profile);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  /** Streaming twin of `invoke`; invalid parameters throw at once. */
  protected override invokeStream<T, S>(spec: MethodSpec, args: Record<string, unknown>,
                                        options?: object): RequestStream<T, S> {
    const [params, callOptions] = prepareCall(spec, args, options);
    return this.stream<T, S>(spec.name, params, callOptions);
  }

  /** Sends one request and wires its deadline and signal; returns a function that cancels it. */
  #start(method: string, params: Record<string, unknown>, options: CallOptions, profile: TimeoutProfile,
         sink: Omit<Pending, "cleanup">, stream = false): () => void {
    const noop = (): void => undefined;
    if (this.#state !== "ready") {
      sink.reject(this.#exitError
        ?? new LMPortError("shutting_down", `worker is ${this.#state}; cannot call ${method}`, {}, true));
      return noop;
    }
    const { signal, timeout, timeoutProfile } = options;
    if (signal?.aborted) {
      sink.reject(new LMPortError("cancelled", `${method} aborted before it was sent`,
        { reason: String(signal.reason) }));
      return noop;
    }
    const id = this.#nextId++;
    const deadline = timeout ?? this.#profileMs(timeoutProfile ?? profile);
    const timer = setTimeout(() => {
      this.#cancel(id, new LMPortError("deadline_exceeded",
        `${method} got no answer within ${deadline} ms + ${this.#settings.grace} ms grace`, { client_side: true }));
      void this.#probe();
    }, Math.min(deadline + this.#settings.grace, MAX_TIMER_MS));
    timer.unref();
    const onAbort = (): void => this.#cancel(id, new LMPortError("cancelled", `${method} aborted`,
      { reason: String(signal?.reason) }));
    signal?.addEventListener("abort", onAbort, { once: true });
    this.#pending.set(id, {
      ...sink,
      cleanup: () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      },
    });
    this.#updateRef();
    try {
      this.#send(requestMessage(id, method, params, {
        stream, timeout_ms: timeout === undefined ? undefined : Math.max(1, Math.ceil(timeout)),
        timeout_profile: timeoutProfile,
      }));
    } catch (error) { // unencodable parameter
      this.#settle(id)?.reject(new LMPortError("invalid_params",
        `cannot encode ${method} parameters: ${String(error)}`));
    }
    return () => this.#cancel(id, new LMPortError("cancelled", `${method} cancelled`));
  }

  /** A profile's milliseconds, from the worker's hello (which always carries them); unknown names: "default". */
  #profileMs(profile: TimeoutProfile): number {
    const profiles = this.hello.timeout_profiles;
    return profiles[profile] ?? profiles.default!;
  }

  /** Fails a pending call locally and tells the worker to stop working on it. */
  #cancel(id: number, error: LMPortError): void {
    const pending = this.#settle(id);
    if (!pending) return;
    if (this.#state === "ready" || this.#state === "closing") this.#send(cancelMessage(id));
    pending.reject(error);
  }

  /** After a client-side deadline: if the worker no longer answers a ping, kill it so every caller is released. */
  async #probe(): Promise<void> {
    if (this.#state !== "ready") return;
    const alive = await Promise.race([
      this.call("ping", {}, { timeout: this.#settings.grace }).then(() => true, () => false),
      delay(this.#settings.grace).then(() => false),
    ]);
    if (!alive && this.#state === "ready") {
      this.#exitError ??= new LMPortError("worker_exited", "worker stopped answering (ping timed out); killed it");
      this.#killGroup("SIGTERM");
      if (!(await within(this.exited, this.#settings.grace))) this.#abandon(this.#exitError);
    }
  }

  #onFrame(message: unknown): void {
    if (!isRecord(message)) return;
    switch (message.type) {
      case "response": {
        const pending = this.#settle(message.id as number);
        if (!pending) return; // cancelled or timed out locally: the late answer is dropped
        if (message.ok === true) pending.resolve(message.result);
        else pending.reject(LMPortError.fromWire(message.error));
        return;
      }
      case "chunk":
        this.#pending.get(message.id as number)?.onChunk?.(message.seq, message.data);
        return;
      case "hello":
        this.#helloWaiter?.resolve(message);
        return;
      case "event":
        for (const listener of this.#eventListeners) {
          try {
            listener(String(message.name), message.data);
          } catch (error) {
            // the listener's own bug: reported as an uncaught exception, after the other listeners and frames
            queueMicrotask(() => { throw error; });
          }
        }
        return;
      default: // unknown message types are ignored (protocol growth)
    }
  }

  #settle(id: number): Pending | undefined {
    const pending = this.#pending.get(id);
    if (!pending) return undefined;
    this.#pending.delete(id);
    pending.cleanup();
    this.#updateRef();
    return pending;
  }

  #waitForHello(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        const ms = this.#settings.startTimeout;
        this.#abandon(new LMPortError("spawn_failed", `worker sent no hello within ${ms} ms`));
      }, this.#settings.startTimeout);
      this.#helloWaiter = {
        resolve: (message) => {
          const hello = message as Hello;
          if (hello.protocol !== PROTOCOL_VERSION) {
            this.#helloWaiter!.reject(new LMPortError("protocol_mismatch",
              `worker speaks protocol ${String(hello.protocol)}; this client speaks ${PROTOCOL_VERSION}`));
            return;
          }
          this.hello = hello;
          this.#state = "ready";
          this.#helloWaiter!.cleanup();
          resolve();
        },
        reject: (error) => {
          this.#helloWaiter!.cleanup();
          void this.close();
          reject(error);
        },
        cleanup: () => {
          clearTimeout(timer);
          this.#helloWaiter = undefined;
          this.#updateRef();
        },
      };
      this.#updateRef();
    });
  }

  async #shutdown(): Promise<void> {
    if (this.#state === "exited") return;
    const wasReady = this.#state === "ready";
    this.#state = "closing";
    // the worker answers, aborts what is running and exits; pending calls get their responses or shutting_down
    if (wasReady) this.#send(requestMessage(this.#nextId++, "shutdown", {}));
    this.#child.stdin!.end();
    const grace = this.#settings.grace;
    if (!(await within(this.exited, grace))) {
      this.#killGroup("SIGTERM");
      if (!(await within(this.exited, Math.min(grace, 2_000)))) this.#killGroup("SIGKILL");
    }
    this.#sweepGroup();
    await this.exited;
  }

  #unreadable(error: unknown): void {
    this.#abandon(error instanceof LMPortError ? error
      : new LMPortError("protocol_error", `unreadable frame from the worker: ${String(error)}`));
  }

  /** Gives up on a misbehaving worker: fail everything, kill the group. */
  #abandon(error: LMPortError): void {
    this.#exitError ??= error;
    this.#killGroup("SIGKILL");
    this.#failAll(error);
  }

  #onExit(error: LMPortError): void {
    if (this.#state === "exited") return;
    if (this.#state === "starting" && error.code === "worker_exited") {
      error = new LMPortError("spawn_failed", `worker ended before its hello: ${error.message}`, error.details);
    }
    const expected = this.#state === "closing";
    this.#state = "exited";
    this.#exitError ??= expected ? new LMPortError("shutting_down", "worker was closed", {}, true) : error;
    this.#helloWaiter?.reject(this.#exitError);
    this.#failAll(this.#exitError);
    this.#sweepGroup();
    this.#markExited();
  }

  #failAll(error: LMPortError): void {
    for (const id of [...this.#pending.keys()]) this.#settle(id)?.reject(error);
  }

  #send(message: Record<string, unknown>): void {
    const frame = encodeFrame(message);
    if (this.#writeBlocked) this.#writeQueue.push(frame);
    else this.#writeBlocked = !this.#child.stdin!.write(frame);
  }

  #flush(): void {
    this.#writeBlocked = false;
    while (!this.#writeBlocked && this.#writeQueue.length > 0) {
      this.#writeBlocked = !this.#child.stdin!.write(this.#writeQueue.shift()!);
    }
  }

  /**
   * Keeps Node alive only while something is in flight; an idle or closed worker never holds the loop. Called on
   * every start and settle, it touches the handles only when the worker turns busy or idle.
   */
  #updateRef(): void {
    const busy = this.#state !== "exited" && (this.#pending.size > 0 || this.#helloWaiter !== undefined);
    if (busy === this.#referenced) return;
    this.#referenced = busy;
    const child = this.#child;
    for (const handle of [child, child.stdout, child.stdin, child.stderr] as (ChildProcess | Socket | null)[]) {
      if (busy) handle?.ref();
      else handle?.unref();
    }
  }

  #killGroup(signal: NodeJS.Signals): void {
    if (this.pgid <= 1) return; // never spawned: -1 or 1 would signal far more than the worker
    try {
      process.kill(-this.pgid, signal);
    } catch {
      // ESRCH: the group is gone already
    }
  }

  /** Kills anything left in the worker's group once the leader has gone (a child it failed to reap). */
  #sweepGroup(): void {
    this.#killGroup("SIGKILL");
  }
}

/** Splits a generated wrapper's arguments into wire parameters and call options, and validates the parameters. */
export function prepareCall(spec: MethodSpec, args: Record<string, unknown>,
                            options: object = {}): [Record<string, unknown>, CallOptions] {
  const params: Record<string, unknown> = {};
  const callOptions: Record<string, unknown> = {};
  for (const [key, value] of Object.entries({ ...args, ...options })) {
    if (value === undefined) continue;
    (CALL_OPTION_KEYS.has(key) ? callOptions : params)[key] = value;
  }
  checkFields(spec.name, spec.params, params);
  return [params, callOptions as CallOptions];
}

function exitError(code: number | null, signal: NodeJS.Signals | null): LMPortError {
  const how = signal !== null ? `killed by ${signal}` : `exited with code ${String(code)}`;
  return new LMPortError("worker_exited", `lmport worker ${how}`, { exit_code: code, signal });
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}

async function within(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(false), ms); });
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
