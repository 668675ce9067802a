/**
 * Local validation of call parameters against the field tables generated from the manifest, so a bad option
 * fails before anything is sent, with the same wording as the worker (`invalid_params`, the field named).
 */

import { LMPortError, isRecord } from "./errors.js";

/** One parameter or option as the manifest describes it (generated into src/generated). */
export interface FieldSpec {
  readonly name: string;
  /** Manifest type string: "str", "int", "float", "bool", "dict", "handle", "list[int]", unions with "|", ... */
  readonly type: string;
  readonly required?: boolean;
  readonly choices?: readonly unknown[];
  readonly min?: number;
  readonly max?: number;
  /** The value must be > min, not >= min (e.g. top_p in (0, 1]). */
  readonly exclusive_min?: boolean;
  /** Nested fields, for a map parameter that follows a schema (e.g. sampling_params). */
  readonly fields?: readonly FieldSpec[];
}

export function invalidParams(field: string, message: string): LMPortError {
  return new LMPortError("invalid_params", `${field}: ${message}`, { field });
}

// Field tables are module constants (generated): each is indexed once, not per call or per list item.
const fieldNames = new WeakMap<readonly FieldSpec[], ReadonlySet<string>>();

function namesOf(fields: readonly FieldSpec[]): ReadonlySet<string> {
  let names = fieldNames.get(fields);
  if (names === undefined) fieldNames.set(fields, names = new Set(fields.map((f) => f.name)));
  return names;
}

/** Checks `value` against `fields`: unknown keys, missing required ones, types, choices and ranges. */
export function checkFields(owner: string, fields: readonly FieldSpec[], value: Record<string, unknown>,
                            prefix = ""): void {
  const known = namesOf(fields);
  for (const key of Object.keys(value)) {
    if (!known.has(key) && value[key] !== undefined) {
      throw invalidParams(prefix + key, `unknown ${owner} field; known: ${[...known].join(", ")}`);
    }
  }
  for (const field of fields) {
    const v = value[field.name];
    const name = prefix + field.name;
    if (v === undefined) {
      if (field.required) throw invalidParams(name, `is required (${field.type})`);
      continue;
    }
    if (!matchesType(field.type, v)) throw invalidParams(name, `expected ${field.type}, got ${describe(v)}`);
    if (v === null) continue;
    if (field.choices && !field.choices.includes(v)) {
      throw invalidParams(name, `must be one of ${JSON.stringify(field.choices)}, got ${describe(v)}`);
    }
    if (typeof v === "number") {
      if (field.min !== undefined && (field.exclusive_min ? v <= field.min : v < field.min)) {
        throw invalidParams(name, `must be ${field.exclusive_min ? ">" : ">="} ${field.min}, got ${v}`);
      }
      if (field.max !== undefined && v > field.max) throw invalidParams(name, `must be <= ${field.max}, got ${v}`);
    }
    if (field.fields) checkNested(field.name, field.fields, v, name);
  }
}

/** Validates a schema-typed value: one map, or a list of maps (one per prompt). */
function checkNested(owner: string, fields: readonly FieldSpec[], value: unknown, name: string): void {
  if (isRecord(value)) checkFields(owner, fields, value, `${name}.`);
  else if (Array.isArray(value)) value.forEach((item, i) => checkNested(owner, fields, item, `${name}[${i}]`));
}

/** Whether `value` fits a manifest type string; unknown type names accept anything. */
export function matchesType(type: string, value: unknown): boolean {
  return checkOf(type)(value);
}

type Check = (value: unknown) => boolean;

// Type strings come from the manifest, a handful: each is parsed once into a check, not per call or list element.
const checks = new Map<string, Check>();

function checkOf(type: string): Check {
  let check = checks.get(type);
  if (check === undefined) {
    const alternatives = splitUnion(type).map(checkOne);
    check = alternatives.length === 1 ? alternatives[0]! : (value) => alternatives.some((alt) => alt(value));
    checks.set(type, check);
  }
  return check;
}

function checkOne(type: string): Check {
  const list = /^list\[(.*)\]$/.exec(type);
  if (list) {
    const item = checkOf(list[1]!);
    return (value) => Array.isArray(value) && value.every((v) => item(v));
  }
  switch (type) {
    case "str": return (value) => typeof value === "string";
    case "int": return (value) => Number.isInteger(value);
    case "float": return (value) => typeof value === "number";
    case "bool": return (value) => typeof value === "boolean";
    case "null": return (value) => value === null;
    case "dict": return isRecord;
    case "list": return Array.isArray;
    case "handle": return (value) => typeof value === "string" || (isRecord(value) && typeof value.ref === "string");
    default: return () => true;
  }
}

/** Splits "a|list[b|c]" at top-level bars only. */
export function splitUnion(type: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < type.length; i++) {
    const c = type[i];
    if (c === "[") depth++;
    else if (c === "]") depth--;
    else if (c === "|" && depth === 0) {
      parts.push(type.slice(start, i));
      start = i + 1;
    }
  }
  parts.push(type.slice(start));
  return parts.map((p) => p.trim());
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
  if (typeof value === "number" || typeof value === "boolean") return `${typeof value} ${value}`;
  return typeof value;
}
