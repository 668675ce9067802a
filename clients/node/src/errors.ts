/** Every failure the client reports: a protocol error from the worker or one the client raises itself. */

/**
 * Error codes. The first group comes from the worker (protocol v1); the rest are the client's own:
 * `worker_exited` (the worker process ended, or was killed for not answering, while the call was pending),
 * `protocol_mismatch` (the hello announced another major version), `protocol_error` (an unreadable frame from the
 * worker) and `spawn_failed` (no Python found, or no hello in time).
 */
export type ErrorCode =
  | "invalid_request" | "method_not_found" | "invalid_params" | "unsupported" | "not_found" | "cancelled"
  | "deadline_exceeded"
  | "overloaded" | "out_of_memory" | "engine_error" | "shutting_down" | "internal"
  | "worker_exited" | "protocol_mismatch" | "protocol_error" | "spawn_failed"
  | (string & {});

export class LMPortError extends Error {
  readonly code: ErrorCode;
  readonly retryable: boolean;
  readonly details: Record<string, unknown>;
  /** Python exception class, when the worker reported one. */
  readonly pythonType: string | undefined;
  /** Python traceback, only when the worker runs with --debug. */
  readonly traceback: string | undefined;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}, retryable = false,
              pythonType?: string, traceback?: string) {
    super(message);
    this.name = "LMPortError";
    this.code = code;
    this.details = details;
    this.retryable = retryable;
    this.pythonType = pythonType;
    this.traceback = traceback;
  }

  /** Builds the error from the `error` map of a worker `response` frame. */
  static fromWire(error: unknown): LMPortError {
    const e = isRecord(error) ? error : {};
    const details = isRecord(e.details) ? e.details : {};
    return new LMPortError(
      typeof e.code === "string" ? e.code : "internal",
      typeof e.message === "string" ? e.message : "worker returned a malformed error",
      details,
      e.retryable === true,
      typeof e.python_type === "string" ? e.python_type : undefined,
      typeof e.traceback === "string" ? e.traceback : undefined,
    );
  }
}

export function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value) && !(value instanceof Uint8Array);
}
