// The shared protocol vectors (tests/vectors, written by `python -m lmport.bridge.vectors`): this client must decode
// every frame to its meaning and encode every host message to the same bytes.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { decode, encode } from "@msgpack/msgpack";
import { FrameDecoder, cancelMessage, decodeBody, encodeFrame, requestMessage } from "../src/protocol.js";
import { findUp } from "./helpers.js";

interface ValueVector { name: string; msgpack: string; value: unknown; encode?: boolean }
interface MessageVector { name: string; direction: string; frame: string; message: Record<string, unknown> }

const dir = findUp("tests/vectors");
const load = <T>(name: string): T[] => JSON.parse(readFileSync(`${dir}/${name}.json`, "utf8")).vectors as T[];
const values = load<ValueVector>("values");
const messages = load<MessageVector>("messages");

/** Tagged JSON meaning -> the JS value msgpack decoding gives ({"$float": x} -> x, {"$bin": hex} -> bytes). */
function untag(meaning: unknown): unknown {
  if (Array.isArray(meaning)) return meaning.map(untag);
  if (meaning !== null && typeof meaning === "object") {
    const obj = meaning as Record<string, unknown>;
    const keys = Object.keys(obj);
    if (keys.length === 1 && keys[0] === "$float") return obj.$float;
    // decoded bin is a Buffer view of the input
    if (keys.length === 1 && keys[0] === "$bin") return Buffer.from(obj.$bin as string, "hex");
    return Object.fromEntries(keys.map((k) => [k, untag(obj[k])]));
  }
  return meaning;
}

/** JS has one number type: a float with an integral value (1.0, -0.0) is encoded as an int, which the worker
 * accepts wherever a float is expected. Those vectors are checked for decoding only. */
function hasIntegralFloat(meaning: unknown): boolean {
  if (Array.isArray(meaning)) return meaning.some(hasIntegralFloat);
  if (meaning !== null && typeof meaning === "object") {
    const obj = meaning as Record<string, unknown>;
    if ("$float" in obj) return Number.isSafeInteger(obj.$float);
    return Object.values(obj).some(hasIntegralFloat);
  }
  return false;
}

const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString("hex");

test("value vectors decode to their meaning", () => {
  assert.ok(values.length > 40);
  for (const v of values) {
    assert.deepStrictEqual(decode(Buffer.from(v.msgpack, "hex")), untag(v.value), v.name);
  }
});

test("value vectors encode to the same bytes", () => {
  let checked = 0;
  for (const v of values) {
    if (v.encode === false || hasIntegralFloat(v.value)) continue;
    assert.equal(hex(encode(untag(v.value))), v.msgpack, v.name);
    checked++;
  }
  assert.ok(checked > 40, `only ${checked} vectors encoded`);
});

test("message vectors: frames decode to their messages", () => {
  for (const v of messages) {
    const frame = Buffer.from(v.frame, "hex");
    assert.equal(frame.readUInt32BE(0), frame.length - 4, `${v.name}: header`);
    assert.deepStrictEqual(decodeBody(frame.subarray(4)), untag(v.message), v.name);
  }
});

test("message vectors: host messages built by this client are byte-identical", () => {
  const host = messages.filter((v) => v.direction === "host_to_worker" && !hasIntegralFloat(v.message));
  assert.ok(host.length >= 5);
  for (const v of host) {
    const m = untag(v.message) as Record<string, unknown>;
    const built = m.type === "cancel" ? cancelMessage(m.id as number)
      : requestMessage(m.id as number, m.method as string, (m.params ?? {}) as Record<string, unknown>, {
        stream: m.stream as boolean | undefined, timeout_ms: m.timeout_ms as number | undefined,
        timeout_profile: m.timeout_profile as string | undefined,
      });
    if (m.params === undefined) delete built.params; // the vector shows that params may be omitted
    assert.equal(hex(encodeFrame(built)), v.frame, v.name);
  }
});

test("each frame owns its bytes: the shared encoder's next frame, even a failed one, leaves it as it was", () => {
  const first = encodeFrame(requestMessage(1, "tokenize", { text: "x".repeat(300) }));
  const snapshot = Buffer.from(first);
  encodeFrame(requestMessage(2, "generate", { prompts: ["y".repeat(5_000)] }));
  assert.throws(() => encodeFrame({ bad: 10n ** 30n }));
  assert.deepEqual(first, snapshot);
  assert.deepEqual(decodeBody(first.subarray(4)), { id: 1, method: "tokenize", params: { text: "x".repeat(300) },
    type: "request" });
  assert.equal(hex(encodeFrame(cancelMessage(3)).subarray(4)), hex(encode({ id: 3, type: "cancel" })));
});

test("frames are reassembled from any chunking", () => {
  const stream = Buffer.concat(messages.map((v) => Buffer.from(v.frame, "hex")));
  const expected = messages.map((v) => Buffer.from(v.frame, "hex").subarray(4).toString("hex"));
  for (const size of [1, 2, 3, 5, 7, 64, 1000, stream.length]) {
    const decoder = new FrameDecoder();
    const got: string[] = [];
    for (let i = 0; i < stream.length; i += size) {
      for (const body of decoder.push(stream.subarray(i, i + size))) got.push(body.toString("hex"));
    }
    assert.deepStrictEqual(got, expected, `chunk size ${size}`);
    assert.equal(decoder.pending, 0);
  }
});

test("an oversized frame is refused", () => {
  const decoder = new FrameDecoder(16);
  assert.throws(() => decoder.push(Buffer.from("00000100", "hex")), { code: "protocol_error" });
});
