/** lmport for Node: start a Python lmport worker and call it with promises and async iterables. */

export * from "./generated/api.js"; // Methods, SamplingParams, EngineOptions, ... (generated from the manifest)
export { Pool, type PoolOptions } from "./pool.js";
export { LMPortError, type ErrorCode } from "./errors.js";
export { RequestStream } from "./stream.js";
export {
  Worker, PROTOCOL_VERSION, type CallOptions, type Hello, type MethodSpec, type SpawnOptions, type TimeoutProfile,
} from "./transport.js";
export { FrameDecoder, cancelMessage, decodeBody, encodeFrame, requestMessage } from "./protocol.js";
export { checkFields, matchesType, type FieldSpec } from "./validate.js";
export { findPython } from "./python.js";
