/** The AsyncIterable a streaming call returns: chunks in order, then the call's summary. */

import { LMPortError } from "./errors.js";

type Waiter<T> = { resolve: (r: IteratorResult<T>) => void; reject: (e: unknown) => void };

/**
 * Deltas of one streaming request. Iterate it with `for await`; leaving the loop early (break, return, throw)
 * cancels the request in the worker. `summary` resolves with the final response (usage, finish reasons, metrics)
 * once the stream has ended, and rejects with the call's error; an ignored rejection is never reported as unhandled.
 */
export class RequestStream<T = unknown, S = unknown> implements AsyncIterableIterator<T> {
  readonly summary: Promise<S>;
  private readonly queue: T[] = [];
  private readonly waiters: Waiter<T>[] = [];
  private nextSeq = 0;
  private finished = false;
  private failure: unknown = undefined;
  private settle!: { resolve: (s: S) => void; reject: (e: unknown) => void };

  /** @internal — built by the transport, which feeds it with push/end/fail. */
  constructor(private readonly cancelRequest: () => void) {
    this.summary = new Promise<S>((resolve, reject) => { this.settle = { resolve, reject }; });
    this.summary.catch(() => undefined);
  }

  /** @internal */
  push(seq: unknown, data: T): void {
    if (this.finished) return;
    if (seq !== this.nextSeq) {
      this.fail(new LMPortError("protocol_error", `stream chunk seq ${String(seq)}, expected ${this.nextSeq}`));
      this.cancelRequest();
      return;
    }
    this.nextSeq++;
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve({ value: data, done: false });
    else this.queue.push(data);
  }

  /** @internal */
  end(summary: S): void {
    if (this.finished) return;
    this.finished = true;
    this.settle.resolve(summary);
    for (const w of this.waiters.splice(0)) w.resolve({ value: undefined, done: true });
  }

  /** @internal */
  fail(error: unknown): void {
    if (this.finished) return;
    this.finished = true;
    this.failure = error;
    this.settle.reject(error);
    for (const w of this.waiters.splice(0)) w.reject(error);
  }

  next(): Promise<IteratorResult<T>> {
    const value = this.queue.shift();
    if (value !== undefined) return Promise.resolve({ value, done: false });
    if (this.finished) {
      return this.failure === undefined ? Promise.resolve({ value: undefined, done: true })
        : Promise.reject(this.failure);
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** Called when a `for await` loop exits early: cancels the request if it is still running. */
  return(): Promise<IteratorResult<T>> {
    this.cancel();
    return Promise.resolve({ value: undefined, done: true });
  }

  /** Cancels the request in the worker (no-op once it has finished). */
  cancel(): void {
    this.queue.length = 0;
    if (this.finished) return;
    this.cancelRequest();
    this.fail(new LMPortError("cancelled", "stream cancelled by the consumer"));
    this.failure = undefined; // the consumer chose to stop: further next() calls just report done
  }

  [Symbol.asyncIterator](): this {
    return this;
  }
}
