"""Elixir generator: the public `LMPort` module and `LMPort.Schema` (the manifest as data) for clients/elixir.

The hand-written transport (LMPort.Worker, LMPort.Client, LMPort.Validate) stays in clients/elixir/lib/lmport;
this writes only lib/lmport/generated/*.ex.
"""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

from lmport.bridge.codegen.common import (
    api_methods,
    facts,
    header,
    option_params,
    params_schema,
    positional_params,
    schema_for_param,
    snake_case,
    type_alternatives,
)

OUT_DIR = "lib/lmport/generated"
_RESERVED = frozenset({"after", "and", "catch", "do", "else", "end", "false", "fn", "in", "nil", "not", "or",
                       "rescue", "true", "when", "worker", "opts"})
_SPEC_TYPES = {"str": "String.t()", "int": "integer()", "float": "float()", "bool": "boolean()", "any": "term()",
               "dict": "map() | keyword()", "handle": "map() | String.t()", "list": "list()",
               "list[int]": "[integer()]", "list[float]": "[number()]", "list[str]": "[String.t()]",
               "list[dict]": "[map()]", "null": "nil"}
# Keys of a parameter spec that validation needs (docs stay in the @doc text, not in the data).
_SPEC_KEYS = ("name", "type", "required", "default", "choices", "min", "max", "exclusive_min")


def generate(manifest: dict[str, Any]) -> dict[str, str]:
    return {f"{OUT_DIR}/schema.ex": _schema_module(manifest), f"{OUT_DIR}/lmport.ex": _api_module(manifest)}


# ---------------------------------------------------------------- Elixir literals

def literal(value: Any, indent: int = 0) -> str:
    """An Elixir literal for JSON-like data; multi-line (indented) when the one-line form is long."""
    flat = _flat(value)
    if len(flat) + indent <= 100 or not isinstance(value, (list, dict)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, list):
        items = [pad + literal(v, indent + 2) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    items = [f"{pad}{_flat(str(k))} => {literal(v, indent + 2)}" for k, v in value.items()]
    return "%{\n" + ",\n".join(items) + "\n" + " " * indent + "}"


class _Code(str):
    """Elixir source to emit as it is (a reference such as `@schemas["SamplingParams"]`), not as a string literal."""


def _flat(value: Any) -> str:
    if isinstance(value, _Code):
        return str(value)
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    if isinstance(value, dict):
        return "%{" + ", ".join(f"{_flat(str(k))} => {_flat(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as an Elixir literal: {value!r}")


def _float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"manifest holds a non-finite float ({value}); Elixir has no literal for it")
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if "." not in mantissa:
        mantissa += ".0"   # Elixir needs digits on both sides of the point: 1e-05 -> 1.0e-5
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def _string(value: str) -> str:
    # JSON's escapes (\" \\ \n \t and \u with four hex digits) are valid in Elixir strings; only interpolation
    # needs escaping.
    return json.dumps(value, ensure_ascii=False).replace("#{", "\\#{")


def _doc(text: str, indent: int = 2) -> str:
    """A ~S heredoc (no interpolation, no escapes) holding `text`."""
    pad = " " * indent
    body = "\n".join((pad + line).rstrip() for line in text.replace('"""', '""\\"').strip("\n").splitlines())
    return f'{pad}~S"""\n{body}\n{pad}"""'


# ---------------------------------------------------------------- LMPort.Schema

def _schema_module(manifest: dict[str, Any]) -> str:
    schemas = {name: [_spec(f) for f in fields] for name, fields in sorted(manifest["schemas"].items())}

    def params(method: dict[str, Any]) -> Any:
        """A method whose parameters are a whole schema (llm, sampling_params) refers to it instead of a copy."""
        same = params_schema(manifest, method)
        return _Code(f"@schemas[{_flat(same)}]") if same else [_spec(p) for p in method["params"]]

    methods = {m["name"]: {"name": m["name"], "streaming": bool(m.get("streaming")),
                           "timeout_profile": m.get("timeout_profile", "default"), "params": params(m)}
               for m in manifest["methods"]}
    param_schemas = sorted({(p["name"], s) for m in manifest["methods"] for p in m["params"]
                            if (s := schema_for_param(manifest, p))})
    clauses = "".join(f'  def schema_for_param({_flat(name)}), do: @schemas[{_flat(schema)}]\n'
                      for name, schema in param_schemas)
    errors = [{"code": e["code"], "retryable": bool(e.get("retryable"))} for e in manifest["error_codes"]]
    return f'''{header("elixir", "#")}defmodule LMPort.Schema do
  @moduledoc """
  The lmport manifest (protocol {manifest["protocol"]}) as data: methods with their parameter specs, the
  schemas of nested options and the timeout profiles. `LMPort.Validate` checks options against it.
  """

  @schemas {literal(schemas, 2)}

  @methods {literal(methods, 2)}

  @error_codes {literal(errors, 2)}

  @timeout_profiles {literal(manifest["timeout_profiles"], 2)}

  @doc "Protocol version the API was generated from."
  def protocol, do: {_flat(manifest["protocol"])}

  @doc "lmport version the API was generated from."
  def version, do: {_flat(manifest.get("version", ""))}

  @doc "Every method of the manifest, by name."
  def methods, do: @methods

  @doc "One method's spec: name, streaming, timeout_profile and params."
  def method(name), do: Map.fetch!(@methods, name)

  @doc "The schemas of nested options (field specs), by name."
  def schemas, do: @schemas

  @doc "The field specs a dict parameter is validated against, or nil."
{clauses}  def schema_for_param(_name), do: nil

  @doc "Error codes the worker answers with, and whether each is retryable."
  def error_codes, do: @error_codes

  @doc "Timeout profiles in milliseconds."
  def timeout_profiles, do: @timeout_profiles
end
'''


def _spec(field: dict[str, Any]) -> dict[str, Any]:
    return {k: field[k] for k in _SPEC_KEYS if k in field}


# ---------------------------------------------------------------- LMPort

def _api_module(manifest: dict[str, Any]) -> str:
    profiles = manifest["timeout_profiles"]
    profile_list = ", ".join(f"`:{name}` ({ms} ms)" for name, ms in profiles.items())
    errors = "\n".join(f"  * `{json.dumps(e['code'])}`{' (retryable)' if e.get('retryable') else ''} — "
                       f"{_one_line(e.get('doc', ''))}" for e in manifest["error_codes"])
    moduledoc = f"""
lmport for Elixir: local LLM inference in a Python worker process, driven over an Erlang Port
(protocol {manifest["protocol"]}, lmport {manifest.get("version", "")}).

Every function takes the worker first — a pid or the registered name of an `LMPort.Worker`, or
`{{:pool, pool}}` for an `LMPort.Pool` (the same calls, spread over its workers) — and returns
`{{:ok, result}}` or `{{:error, %LMPort.Error{{}}}}`; each has a `!` variant that returns the result or raises
`LMPort.Error`. Results are plain maps with string keys (vLLM's field names). Options are checked
locally against the manifest (unknown keys, types, ranges, choices) before anything is sent.

## Call options (every function)

  * `:timeout` — milliseconds; the worker aborts the request when it passes (`"deadline_exceeded"`), and
    the client gives up after it plus a grace (`"deadline_exceeded"` with `details["client_side"] == true`),
    cancelling the request in the worker.
  * `:timeout_profile` — {profile_list}.
    Without either, `config :lmport, timeout: ms` or `timeout_profile: name` applies, else the method's
    default profile.

## Example

    LMPort.run(fn worker ->
      llm = LMPort.llm!(worker, "smollm2")
      [output] = LMPort.generate!(worker, llm, "The capital of France is",
                                  sampling_params: [max_tokens: 16, temperature: 0.0])
      IO.puts(hd(output["outputs"])["text"])
    end)

## Error codes

{errors}
"""
    functions = "".join(_function(manifest, m) for m in api_methods(manifest))
    return f'''{header("elixir", "#")}defmodule LMPort do
  @moduledoc {_doc(moduledoc).lstrip()}

  @typedoc "A running `LMPort.Worker` (pid or registered name), or `{{:pool, pool}}` for an `LMPort.Pool`."
  @type worker :: LMPort.Worker.server() | {{:pool, LMPort.Pool.server()}}
  @type result(t) :: {{:ok, t}} | {{:error, LMPort.Error.t()}}

  @doc """
  Runs `fun` with a fresh worker and stops the worker afterwards, whatever happens (like `VLLM.run/2`).
  `opts` are `LMPort.Worker.start_link/1` options.
  """
  defdelegate run(fun, opts \\\\ []), to: LMPort.Runner

  @doc "Starts an `LMPort.Worker` linked to the caller; see its options. Use `{{LMPort.Worker, opts}}` in a supervisor."
  defdelegate start_link(opts \\\\ []), to: LMPort.Worker

  @doc "Stops a worker: `shutdown`, grace, then TERM/KILL of its process group."
  defdelegate stop(worker), to: LMPort.Worker
{functions}end
'''


def _function(manifest: dict[str, Any], method: dict[str, Any]) -> str:
    name = method["name"]
    positional = positional_params(method)
    args = [_var(p["name"]) for p in positional]
    sig_args = ", ".join(["worker", *args, "opts \\\\ []"])
    call_args = ", ".join(["worker", *args, "opts"])
    params_map = "%{" + ", ".join(f"{_flat(p['name'])} => {_var(p['name'])}" for p in positional) + "}"
    arity = len(args) + 2
    spec_args = ", ".join(["worker()", *(_spec_type(p.get("type")) for p in positional), "keyword()"])
    return f'''
  @doc {_doc(_method_doc(manifest, method)).lstrip()}
  @spec {name}({spec_args}) :: result(term())
  def {name}({sig_args}),
    do: LMPort.Client.call(worker, {_flat(name)}, {params_map}, opts)

  @doc "Like `{name}/{arity}`, but returns the result or raises `LMPort.Error`."
  @spec {name}!({spec_args}) :: term()
  def {name}!({sig_args}), do: LMPort.Client.unwrap!({name}({call_args}))
'''


def _method_doc(manifest: dict[str, Any], method: dict[str, Any]) -> str:
    lines = [method.get("doc", "").strip() or f"Calls the worker's `{method['name']}` method.", ""]
    positional = positional_params(method)
    if positional:
        lines += ["## Arguments", ""] + [_param_line(manifest, p, f"`{_var(p['name'])}`") for p in positional] + [""]
    options = option_params(method)
    lines += ["## Options", ""] + [_param_line(manifest, p, f"`:{p['name']}`") for p in options]
    if method.get("streaming"):
        lines.append("  * `:stream` — `true` returns `{:ok, stream}`: a lazy `Stream` of the chunks' deltas;\n"
                     "    halting it early cancels the request in the worker. `:with_summary` also ends the\n"
                     "    stream with `{:summary, response}` (usage, finish reasons, metrics)")
    profile = method.get("timeout_profile", "default")
    lines.append(f"  * `:timeout`, `:timeout_profile` — see the module doc; this method's default profile is\n"
                 f"    `:{profile}` ({manifest['timeout_profiles'].get(profile, '?')} ms)")
    returns = method.get("returns") or {}
    if returns:
        lines += ["", f"Returns `{returns.get('type', 'any')}`: {_one_line(returns.get('doc', ''))}".rstrip(": ")]
    return "\n".join(lines)


def _param_line(manifest: dict[str, Any], param: dict[str, Any], label: str) -> str:
    kind = " | ".join(type_alternatives(param.get("type"))) + (", required" if param.get("required") else "")
    text = _one_line(param.get("doc", ""))
    if schema := schema_for_param(manifest, param):
        fields = ", ".join(f"`{f['name']}`" for f in manifest["schemas"][schema])
        text = _sentence(text) + f" A keyword list or map of {schema} fields ({fields}), checked locally."
    text = " ".join(filter(None, [_sentence(text), facts(param, lambda value: f"`{_flat(value)}`")]))
    line = f"* {label} ({kind}) — {text}".rstrip(" —")
    return textwrap.fill(line, width=108, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False,
                         break_long_words=False)


def _sentence(text: str) -> str:
    return text if not text or text.endswith((".", "!", "?")) else text + "."


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _var(name: str) -> str:
    var = snake_case(name)
    return var + "_" if var in _RESERVED else var


def _spec_type(type_str: str | None) -> str:
    return " | ".join(_SPEC_TYPES[t] for t in type_alternatives(type_str))
