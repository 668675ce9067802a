/**
 * Wire protocol v1 on the host side: frames (a 4-byte unsigned big-endian length, then that many bytes of one
 * msgpack map) and the host -> worker messages. Keys are written in sorted order, as in tests/vectors.
 */

import { Decoder, Encoder } from "@msgpack/msgpack";
import { LMPortError } from "./errors.js";

const HEADER = 4;
const MAX_LENGTH = 0xffff_ffff;

// One codec of each kind for the process, not one per frame: frames are encoded and decoded one at a time,
// synchronously (the codecs clone themselves if ever re-entered). The encoder keeps its buffer, grown to the
// largest frame sent so far; encodeFrame copies the body out of it before the next frame can reuse it.
const encoder = new Encoder({ ignoreUndefined: true });
const decoder = new Decoder();

/** Encodes a message as one frame (header + msgpack body). Undefined map values are left out. */
export function encodeFrame(message: unknown): Buffer {
  const body = encoder.encodeSharedRef(message); // a view of the encoder's buffer, valid until its next use
  if (body.length > MAX_LENGTH) throw new LMPortError("invalid_request", `frame of ${body.length} bytes is too long`);
  const frame = Buffer.allocUnsafe(HEADER + body.length);
  frame.writeUInt32BE(body.length, 0);
  frame.set(body, HEADER); // the copy
  return frame;
}

/** Decodes one frame body (without its header). */
export function decodeBody(body: Uint8Array): unknown {
  return decoder.decode(body);
}

/**
 * Reassembles frames from chunks cut at arbitrary boundaries. Chunks are kept as a list and copied once per
 * frame, so a large frame arriving in many small chunks costs linear time.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private need = -1; // body length of the frame being read, -1 while its header is incomplete

  constructor(private readonly maxFrameBytes = MAX_LENGTH) {}

  /** Adds a chunk and returns the bodies of every frame it completed, in order. */
  push(chunk: Buffer): Buffer[] {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const bodies: Buffer[] = [];
    for (;;) {
      if (this.need < 0) {
        if (this.buffered < HEADER) break;
        this.need = this.take(HEADER).readUInt32BE(0);
        if (this.need > this.maxFrameBytes) {
          throw new LMPortError("protocol_error",
            `worker sent a frame of ${this.need} bytes (limit ${this.maxFrameBytes})`);
        }
      }
      if (this.buffered < this.need) break;
      bodies.push(this.take(this.need));
      this.need = -1;
    }
    return bodies;
  }

  /** Bytes received that do not form a whole frame yet. */
  get pending(): number {
    return this.buffered;
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    if (first !== undefined && first.length >= n) { // common case: no copy
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0]!;
      const part = Math.min(n - filled, chunk.length);
      chunk.copy(out, filled, 0, part);
      filled += part;
      if (part === chunk.length) this.chunks.shift();
      else this.chunks[0] = chunk.subarray(part);
    }
    this.buffered -= n;
    return out;
  }
}

/** Per-request envelope options (`undefined` ones are left out). */
export interface RequestEnvelope {
  stream?: boolean | undefined;
  timeout_ms?: number | undefined;
  timeout_profile?: string | undefined;
}

/** A `request` message. */
export function requestMessage(id: number | string, method: string, params: Record<string, unknown>,
                               envelope: RequestEnvelope = {}): Record<string, unknown> {
  return {
    id, method, params, stream: envelope.stream || undefined, timeout_ms: envelope.timeout_ms,
    timeout_profile: envelope.timeout_profile, type: "request",
  };
}

/** A `cancel` message. */
export function cancelMessage(id: number | string): Record<string, unknown> {
  return { id, type: "cancel" };
}
