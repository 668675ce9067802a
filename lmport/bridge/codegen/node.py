"""Node (TypeScript) API layer for clients/node: option types, field tables for local validation, and the abstract
`Methods` class whose methods wrap `invoke` / `invokeStream`. Two hand-written classes extend it: `Worker` (one
process, clients/node/src/transport.ts) and `Pool` (several, clients/node/src/pool.ts), so both have the same
typed method set.

The manifest's `results` records (lmport/bridge/results.py) become exported interfaces (`RequestOutput`, `Chunk`,
`Summary`, ...), used as the return types of the methods whose `returns` names them (`result`, and `chunk` /
`summary` for the streaming form); other methods return `WireMap` / `HandleMap` as before.

One file, src/generated/api.ts. Parameters the manifest marks required (see common.positional_params) are
positional; the rest go in a per-method options object that also takes the call options (signal, timeout,
timeoutProfile). A dict parameter named after a schema (`sampling_params` -> SamplingParams) is typed and
validated with that schema's fields.
"""

from __future__ import annotations

import json
from typing import Any

from lmport.bridge.codegen import common
from lmport.bridge.results import split_union

PATH = "src/generated/api.ts"

# Members of the hand-written Worker and Pool a generated method must not shadow.
RESERVED = frozenset({"call", "stream", "close", "pid", "pgid", "hello", "exited", "onEvent", "invoke",
                      "invokeStream", "methodProfile", "constructor", "spawn", "workers", "size", "ready"})

# Names the hand-written modules export from src/index.ts (or api.ts imports): a generated name must not reuse one.
HANDWRITTEN_EXPORTS = frozenset({"RequestStream", "Worker", "Pool", "PoolOptions", "CallOptions", "MethodSpec", "FieldSpec", "Hello",
                                 "SpawnOptions", "TimeoutProfile", "PROTOCOL_VERSION", "LMPortError", "ErrorCode",
                                 "FrameDecoder", "cancelMessage", "decodeBody", "encodeFrame", "requestMessage",
                                 "checkFields", "matchesType", "findPython"})

# Names the generated prelude, constants and class take.
_PRELUDE_NAMES = frozenset({"Handle", "WireMap", "HandleMap", "TIMEOUT_PROFILES", "ERROR_CODES", "METHODS", "Methods"})

# Results without a record type in the manifest are plain data whose fields the method's doc lists; `any` members
# keep them readable without casts.
_RESULT_TYPES = {"handle": "HandleMap", "dict": "WireMap", "list[dict]": "WireMap[]"}

CALL_OPTIONS = frozenset({"signal", "timeout", "timeoutProfile"})

_TS_TYPES = {"str": "string", "int": "number", "float": "number", "bool": "boolean", "any": "unknown",
             "null": "null", "dict": "Record<string, unknown>", "handle": "Handle", "list": "unknown[]",
             "list[int]": "number[]", "list[float]": "number[]", "list[str]": "string[]",
             "list[dict]": "Record<string, unknown>[]"}

_PRELUDE = """\
import type { RequestStream } from "../stream.js";
import type { CallOptions, MethodSpec, TimeoutProfile } from "../transport.js";
import type { FieldSpec } from "../validate.js";

/** A handle the worker returned (for example from `llm`): the map itself, or its bare `ref` string. */
export type Handle = string | HandleMap;

/**
 * A map the worker sent where the manifest names no result record (describe, ping, health, stats, ...); the
 * method's documentation lists its fields. generate/chat results, chunks and summaries have their own interfaces.
 */
export type WireMap = Record<string, any>;

/** A handle map: `ref` plus whatever the method reports (model, resolved config, ...). */
export interface HandleMap {
  ref: string;
  [key: string]: unknown;
}
"""


def generate(manifest: dict[str, Any]) -> dict[str, str]:
    parts = [common.header("node", "//"), f"// Protocol {manifest['protocol']}.\n\n", _PRELUDE]
    methods = common.api_methods(manifest)
    _check_names(manifest, methods)
    parts += [_schema(name, fields) for name, fields in manifest["schemas"].items()]
    parts += [_record(manifest, name, fields) for name, fields in _records(manifest).items()]
    parts.append(_constants(manifest))
    parts.append(_method_specs(manifest, methods))
    parts += [_options_interface(manifest, m) for m in methods]
    parts.append(_methods_class(manifest, methods))
    return {PATH: "".join(parts)}


# ---------------------------------------------------------------- types and docs

def ts_type(manifest: dict[str, Any], field: dict[str, Any]) -> str:
    alternatives = common.type_alternatives(field.get("type"))
    if "any" in alternatives:
        return "unknown"
    schema = common.schema_for_param(manifest, field)
    with_schema = {"dict": schema, "list[dict]": f"{schema}[]"} if schema else {}
    return " | ".join(with_schema.get(alt) or _TS_TYPES[alt] for alt in alternatives)


def _return_type(manifest: dict[str, Any], method: dict[str, Any]) -> str:
    returns = method.get("returns", {})
    if returns.get("result"):
        return result_type(manifest, returns["result"])
    alternatives = common.type_alternatives(returns.get("type"))
    if "any" in alternatives:
        return "unknown"
    return " | ".join(_RESULT_TYPES.get(alt) or _TS_TYPES[alt] for alt in alternatives)


def _stream_types(manifest: dict[str, Any], method: dict[str, Any]) -> tuple[str, str]:
    """(chunk type, summary type) of a streaming method: its records, else WireMap."""
    returns = method.get("returns", {})
    chunk, summary = (result_type(manifest, returns[key]) if returns.get(key) else "WireMap"
                      for key in ("chunk", "summary"))
    return chunk, summary


_RESULT_SCALARS = {"str": "string", "int": "number", "float": "number", "bool": "boolean", "null": "null"}


def result_type(manifest: dict[str, Any], expr: str) -> str:
    """A result type expression (`list[list[LogprobEntry]|null]|null`) as TypeScript
    (`(LogprobEntry[] | null)[] | null`); a name that is neither a scalar nor a record becomes `unknown`."""
    out: list[str] = []
    for alternative in split_union(expr.replace(" ", "")):
        if alternative.startswith("list[") and alternative.endswith("]"):
            item = result_type(manifest, alternative[5:-1])
            ts = f"({item})[]" if len(split_union(alternative[5:-1])) > 1 else f"{item}[]"
        elif alternative in _records(manifest):
            ts = alternative
        else:
            ts = _RESULT_SCALARS.get(alternative, "unknown")
        if ts not in out:
            out.append(ts)
    return "unknown" if "unknown" in out else " | ".join(out)


def _records(manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return manifest.get("results") or {}


def _doc(lines: list[str], indent: str) -> str:
    text = "\n".join(f"{indent} *{' ' + line if line else ''}" for line in "\n".join(lines).splitlines())
    return f"{indent}/**\n{text}\n{indent} */\n"


def _field_doc(field: dict[str, Any]) -> list[str]:
    facts = _facts(field)
    return [_escape(field.get("doc") or field["name"])] + (["", facts] if facts else [])


def _facts(field: dict[str, Any]) -> str:
    return common.facts(field, lambda value: f"`{json.dumps(value)}`")


def _escape(text: str) -> str:
    return text.replace("*/", "*\u2215")


# ---------------------------------------------------------------- schemas, result records and tables

def _check_names(manifest: dict[str, Any], methods: list[dict[str, Any]]) -> None:
    """Every exported name once: result records must not reuse a schema, options, prelude or hand-written name."""
    taken = {name: "a name the hand-written client exports" for name in HANDWRITTEN_EXPORTS}
    taken.update({name: "a generated prelude name" for name in _PRELUDE_NAMES})
    for name in manifest["schemas"]:
        taken.update({name: "a parameter schema", f"{name}Fields": "a schema's field table"})
    taken.update({_options_name(m): f"the options of {m['name']!r}" for m in methods})
    for name in _records(manifest):
        if name in taken:
            raise ValueError(f"result record {name!r} clashes with {taken[name]} in the Node client")


def _record(manifest: dict[str, Any], name: str, fields: list[dict[str, Any]]) -> str:
    members = "".join(f"  /** {_escape(f.get('doc') or f['name'])} */\n"
                      f"  {f['name']}{'' if f.get('required', True) else '?'}: "
                      f"{result_type(manifest, str(f.get('type') or 'any'))};\n" for f in fields)
    optional = " (a key marked `?` is left out when absent, not sent as null)" \
        if any(not f.get("required", True) for f in fields) else ""
    return (f"\n/** Result record {name}, as the worker sends it{optional}. */\n"
            f"export interface {name} {{\n{members}}}\n")


def _schema(name: str, fields: list[dict[str, Any]]) -> str:
    members = "".join(_doc(_field_doc(f), "  ") + f"  {f['name']}?: {_plain_type(f)};\n" for f in fields)
    return (f"\n/** Fields of {name}; every field is optional (the worker fills the defaults). */\n"
            f"export interface {name} {{\n{members}}}\n\n"
            f"/** Field table of {name}, for local validation. */\n"
            f"export const {name}Fields: readonly FieldSpec[] = [\n"
            + "".join(f"  {_field_spec(None, f)},\n" for f in fields) + "];\n")


def _plain_type(field: dict[str, Any]) -> str:
    alternatives = common.type_alternatives(field.get("type"))
    return "unknown" if "any" in alternatives else " | ".join(_TS_TYPES[a] for a in alternatives)


def _field_spec(manifest: dict[str, Any] | None, field: dict[str, Any]) -> str:
    items = [f"name: {json.dumps(field['name'])}", f"type: {json.dumps(field.get('type') or 'any')}"]
    if field.get("required"):
        items.append("required: true")
    for key in ("choices", "min", "max", "exclusive_min"):
        if field.get(key) is not None:
            items.append(f"{key}: {json.dumps(field[key])}")
    schema = common.schema_for_param(manifest, field) if manifest else None
    if schema:
        items.append(f"fields: {schema}Fields")
    return "{ " + ", ".join(items) + " }"


def _constants(manifest: dict[str, Any]) -> str:
    profiles = ", ".join(f"{k}: {v}" for k, v in manifest["timeout_profiles"].items())
    codes = "".join(f"  {json.dumps(e['code'])}: {{ retryable: {json.dumps(bool(e.get('retryable')))}, "
                    f"doc: {json.dumps(e.get('doc', ''))} }},\n" for e in manifest["error_codes"])
    return ("\n/** The worker's default timeout profiles, in milliseconds (the live ones arrive in `hello`). */\n"
            f"export const TIMEOUT_PROFILES = {{ {profiles} }} as const;\n\n"
            "/** Error codes the worker may answer with. */\n"
            f"export const ERROR_CODES: Readonly<Record<string, {{ retryable: boolean; doc: string }}>> = {{\n"
            f"{codes}}};\n")


def _method_specs(manifest: dict[str, Any], methods: list[dict[str, Any]]) -> str:
    entries = []
    for m in methods:
        schema = common.params_schema(manifest, m)  # its field table is already there: refer to it
        params = f"{schema}Fields" if schema else \
            "[\n" + "".join(f"    {_field_spec(manifest, p)},\n" for p in m["params"]) + "    ]"
        profile = json.dumps(m.get("timeout_profile", "default"))
        entries.append(f"  {json.dumps(m['name'])}: {{\n    name: {json.dumps(m['name'])}, profile: {profile}, "
                       f"params: {params},\n  }},\n")
    return f"\nconst METHODS: Readonly<Record<string, MethodSpec>> = {{\n{''.join(entries)}}};\n"


# ---------------------------------------------------------------- methods

def _options_name(method: dict[str, Any]) -> str:
    return f"{common.pascal_case(method['name'])}Options"


def _options_interface(manifest: dict[str, Any], method: dict[str, Any]) -> str:
    for p in common.option_params(method):
        if p["name"] in CALL_OPTIONS:
            raise ValueError(f"parameter {p['name']!r} of {method['name']!r} clashes with a Node call option")
    doc = (f"\n/** Options of `Worker.{common.camel_case(method['name'])}`: its optional parameters and the call "
           f"options. */\nexport interface {_options_name(method)} extends CallOptions")
    schema = common.params_schema(manifest, method)
    if schema:  # the schema's interface already documents every field: extend it rather than repeat it
        positional = " | ".join(f'"{p["name"]}"' for p in common.positional_params(method))
        return f"{doc}, {f'Omit<{schema}, {positional}>' if positional else schema} {{}}\n"
    members = "".join(_doc(_field_doc(p), "  ") + f"  {p['name']}?: {ts_type(manifest, p)};\n"
                      for p in common.option_params(method))
    return f"{doc} {{\n{members}}}\n"


def _signature(manifest: dict[str, Any], method: dict[str, Any]) -> tuple[str, str]:
    """(parameter list, object literal of the positional arguments)."""
    positional = common.positional_params(method)
    args = []
    for i, p in enumerate(positional):
        optional = not p.get("required") and all(not q.get("required") for q in positional[i:])
        args.append(f"{_identifier(p['name'])}{'?' if optional else ''}: {ts_type(manifest, p)}")
    args.append(f"options?: {_options_name(method)}")
    literal = ", ".join(f"{json.dumps(p['name'])}: {_identifier(p['name'])}" for p in positional)
    return ", ".join(args), "{ " + literal + " }" if literal else "{}"


def _identifier(name: str) -> str:
    return common.camel_case(name)


def _method_doc(method: dict[str, Any], stream: bool) -> list[str]:
    lines = [_escape(method.get("doc") or method["name"])]
    if stream:
        lines += ["", f"Streaming form of `{common.camel_case(method['name'])}`: iterate the deltas with "
                      "`for await`; leaving the loop early cancels the request; `summary` resolves with the "
                      "final response."]
    lines.append("")
    for p in common.positional_params(method):
        text = " ".join(filter(None, [_escape(p.get("doc") or p["name"]), _facts(p)]))
        lines.append(f"@param {_identifier(p['name'])} {text}")
    lines.append("@param options optional parameters and call options (signal, timeout, timeoutProfile)")
    returns = method.get("returns", {})
    if not stream and returns.get("doc"):
        lines.append(f"@returns {_escape(returns['doc'])}")
    return lines


def _methods_class(manifest: dict[str, Any], methods: list[dict[str, Any]]) -> str:
    body = []
    for m in methods:
        name = common.camel_case(m["name"])
        if name in RESERVED or f"{name}Stream" in RESERVED:
            raise ValueError(f"manifest method {m['name']!r} clashes with the Node Worker's or Pool's {name!r}")
        params, literal = _signature(manifest, m)
        spec = f"METHODS[{json.dumps(m['name'])}]!"
        body.append(_doc(_method_doc(m, False), "  ")
                    + f"  {name}({params}): Promise<{_return_type(manifest, m)}> {{\n"
                    f"    return this.invoke({spec}, {literal}, options);\n  }}\n")
        if m.get("streaming"):
            chunk, summary = _stream_types(manifest, m)
            body.append(_doc(_method_doc(m, True), "  ")
                        + f"  {name}Stream({params}): RequestStream<{chunk}, {summary}> {{\n"
                        f"    return this.invokeStream({spec}, {literal}, options);\n  }}\n")
    body.append("  /** The method's own timeout profile, from the manifest (what the worker applies too). */\n"
                "  protected methodProfile(method: string): TimeoutProfile {\n"
                "    return METHODS[method]?.profile ?? \"default\";\n  }\n")
    body.append("  /** Sends one validated call; `Worker` writes it to its process, `Pool` routes it to a worker. */\n"
                "  protected abstract invoke<R>(spec: MethodSpec, args: Record<string, unknown>, options?: object)"
                ": Promise<R>;\n")
    body.append("  /** Streaming twin of `invoke`. */\n"
                "  protected abstract invokeStream<T, S>(spec: MethodSpec, args: Record<string, unknown>, "
                "options?: object): RequestStream<T, S>;\n")
    return ("\n/**\n * Every worker method, each returning a promise (streaming methods also have a `...Stream` form). "
            "`Worker`\n * (one process) and `Pool` (several) implement the transport under them.\n */\n"
            f"export abstract class Methods {{\n{chr(10).join(body)}}}\n")
