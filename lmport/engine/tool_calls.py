"""Tool calling in OpenAI's shapes: `tools` / `tool_choice` validation, the structured-output constraint that
enforces tool_choice 'required' or a named tool (as vLLM does), and parsers that turn generated text into
`tool_calls` — whole, or as OpenAI-shaped stream deltas.

A tool-call parser belongs to a chat-template family (the format the model was trained to call tools in); FAMILIES
maps each to the marker that identifies its templates and its stream parser. The one family so far is `hermes`
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`: Qwen2.5/Qwen3, Hermes, SmolLM2's own fine-tunes), also
the default for templates that name no tool format at all.

Every parser is a stream parser: fed text deltas it returns delta maps (`{"content": str}` or `{"tool_calls":
[...]}`), and the whole result is the merge of the deltas of one feed of the whole text (`ToolCalling.parse`), so
streamed and whole replies come from the same code.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmport.engine.errors import InvalidParams
from lmport.engine.sampling_params import SamplingParams
from lmport.engine.structured_outputs import check_schema

Delta = dict[str, Any]  # {"content": str} or {"tool_calls": [{index, id?, type?, function: {name?, arguments}}]}
MODES = ("auto", "none", "required")


class ToolStream(Protocol):
    def feed(self, text: str) -> list[Delta]: ...
    def finish(self, finish_reason: str | None) -> list[Delta]: ...


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _header(index: int, name: str, arguments: str = "") -> Delta:
    """The first delta of a call: OpenAI sends id, type and name once, then argument fragments."""
    return {"tool_calls": [{"index": index, "id": call_id(), "type": "function",
                            "function": {"name": name, "arguments": arguments}}]}


def _fragment(index: int, arguments: str) -> Delta:
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


def _arguments_text(arguments: Any) -> str:
    """A call's arguments as JSON text (a model that already wrote them as a JSON string keeps its text)."""
    return arguments if isinstance(arguments, str) else json.dumps({} if arguments is None else arguments,
                                                                   ensure_ascii=False)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag` (held back until the next delta)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# --- the hermes family ---

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HERMES_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class HermesStream:
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks (any number, anywhere) become tool calls;
    everything else is content. A block whose JSON does not parse stays content, unless its name was already
    streamed. A block left open at the end (the model stopped right after the JSON) still counts when it parses.
    Whitespace right before a call is dropped."""

    __slots__ = ("buffer", "inside", "calls", "streamed", "sent", "pending_space", "space_before")

    def __init__(self) -> None:
        self.buffer = ""  # text not yet turned into deltas
        self.inside = False  # after an OPEN tag, before its CLOSE
        self.calls = 0  # tool calls started so far
        self.streamed = False  # the current call's header went out (its arguments are streaming)
        self.sent = ""  # the current call's arguments sent so far
        self.pending_space = ""  # trailing whitespace of the content, sent when more content follows
        self.space_before = ""  # the whitespace before the current block, restored if it turns out content

    def feed(self, text: str) -> list[Delta]:
        self.buffer += text
        out: list[Delta] = []
        while True:
            tag = CLOSE if self.inside else OPEN
            at = self.buffer.find(tag)
            if at < 0:
                if self.inside:
                    self._stream_arguments(out)
                else:
                    cut = len(self.buffer) - _partial_suffix(self.buffer, OPEN)
                    self._content(self.buffer[:cut], out)
                    self.buffer = self.buffer[cut:]
                return out
            before, self.buffer = self.buffer[:at], self.buffer[at + len(tag):]
            if self.inside:
                self._complete(before, OPEN + before + CLOSE, out)
            else:
                self._content(before, out)
                self.space_before, self.pending_space = self.pending_space, ""
                self.inside, self.streamed, self.sent = True, False, ""

    def finish(self, finish_reason: str | None) -> list[Delta]:
        out: list[Delta] = []
        rest, self.buffer = self.buffer, ""
        if self.inside:
            self._complete(rest, OPEN + rest, out)
        else:
            self._content(rest, out)
        if self.pending_space and not self.calls:
            out.append({"content": self.pending_space})
        return out

    def _content(self, text: str, out: list[Delta]) -> None:
        text = self.pending_space + text
        kept = text.rstrip()
        self.pending_space = text[len(kept):]
        if kept:
            out.append({"content": kept})

    def _stream_arguments(self, out: list[Delta]) -> None:
        """Send the call's name as soon as it is complete, then its arguments as they grow, holding back what may
        be the block's own closing brace or the start of CLOSE."""
        header = _HERMES_HEADER.match(self.buffer)
        if header is None:
            return
        if not self.streamed:
            out.append(_header(self.calls, json.loads(f'"{header.group(1)}"')))
            self.streamed = True
            self.calls += 1
        raw = self.buffer[header.end():]
        raw = raw[:len(raw) - _partial_suffix(raw, CLOSE)]
        self._send_arguments(_without_closing_brace(raw), out)

    def _send_arguments(self, arguments: str, out: list[Delta]) -> None:
        if len(arguments) > len(self.sent) and arguments.startswith(self.sent):
            out.append(_fragment(self.calls - 1, arguments[len(self.sent):]))
            self.sent = arguments

    def _complete(self, inner: str, raw: str, out: list[Delta]) -> None:
        """A whole block: a tool call when its JSON parses (or its name already went out), else content."""
        self.inside = False
        try:
            call = json.loads(inner)
        except json.JSONDecodeError:
            call = None
        valid = isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]
        if self.streamed:
            header = _HERMES_HEADER.match(inner)
            self._send_arguments(_without_closing_brace(inner[header.end():]) if header else self.sent, out)
        elif valid:
            out.append(_header(self.calls, call["name"], _arguments_text(call.get("arguments"))))
            self.calls += 1
        else:
            self.pending_space = self.space_before
            self._content(raw, out)


def _without_closing_brace(raw: str) -> str:
    """The arguments' text of `{"name": ..., "arguments": <this>}` so far: the block's own brace taken off."""
    raw = raw.rstrip()
    return raw[:-1].rstrip() if raw.endswith("}") else raw


FAMILIES: dict[str, tuple[str, type]] = {"hermes": (OPEN, HermesStream)}  # family -> (template marker, parser)
DEFAULT_FAMILY = "hermes"


def family_for_template(template: str | None) -> str:
    """The tool-call family of a chat template: the first whose marker it contains, else the default."""
    for family, (marker, _) in FAMILIES.items():
        if template and marker in template:
            return family
    return DEFAULT_FAMILY


# --- tool_choice 'required' and a named tool: the output is constrained, then read back ---

class _NamedStream:
    """tool_choice naming a tool: the whole (schema-constrained) output is that tool's arguments."""

    __slots__ = ("name", "started")

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        if not self.started:
            self.started = True
            return [_header(0, self.name, text)]
        return [_fragment(0, text)]

    def finish(self, finish_reason: str | None) -> list[Delta]:
        return [] if self.started else [_header(0, self.name, "{}")]


@dataclass(slots=True)
class _RequiredStream:
    """tool_choice 'required': the output is a JSON array of {name, arguments}; read once it is complete (a
    truncated one stays content)."""
    text: str = ""

    def feed(self, text: str) -> list[Delta]:
        self.text += text
        return []

    def finish(self, finish_reason: str | None) -> list[Delta]:
        try:
            calls = json.loads(self.text)
        except json.JSONDecodeError:
            calls = None
        if finish_reason == "length" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            return [{"content": self.text}] if self.text else []
        return [_header(i, c["name"], _arguments_text(c.get("arguments"))) for i, c in enumerate(calls)]


@dataclass(slots=True)
class _NoTools:
    def feed(self, text: str) -> list[Delta]:
        return [{"content": text}] if text else []

    def finish(self, finish_reason: str | None) -> list[Delta]:
        return []


# --- the request's tools ---

@dataclass(slots=True, frozen=True)
class ToolCalling:
    """A request's validated `tools` and `tool_choice` (mode 'auto', 'none', 'required' or 'function', with
    `name` the tool it names), and the template family whose format 'auto' parses."""
    tools: list[dict[str, Any]]
    mode: str = "auto"
    name: str | None = None
    family: str = DEFAULT_FAMILY
    _parameters: dict[str, Any] = field(default_factory=dict, repr=False)  # tool name -> its parameters schema

    @classmethod
    def from_request(cls, tools: Any, tool_choice: Any = None, family: str = DEFAULT_FAMILY) -> ToolCalling | None:
        """None when there are no tools (and tool_choice asks for none); InvalidParams naming the field
        ("tools[0].function.name", "tool_choice") for anything malformed."""
        tools = check_tools(tools)
        mode, name = check_tool_choice(tool_choice, tools)
        if not tools:
            return None
        parameters = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
        return cls(tools, mode, name, family, parameters)

    def structured_outputs(self) -> dict[str, Any] | None:
        """The constraint that enforces tool_choice, as vLLM does it: 'required' -> a non-empty JSON array of
        {name, arguments} objects (one alternative per tool); a named tool -> its parameters schema."""
        if self.mode == "function":
            return {"json": self._parameters[self.name]}
        if self.mode != "required":
            return None
        alternatives = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                           "arguments": schema},
                         "required": ["name", "arguments"]} for name, schema in self._parameters.items()]
        return {"json": {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}}

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model: none with tool_choice 'none' (it may not call them)."""
        return None if self.mode == "none" else self.tools

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """`params` with the structured output that enforces tool_choice (unchanged for 'auto' and 'none')."""
        constraint = self.structured_outputs()
        if constraint is None:
            return params
        if params.structured_outputs is not None:
            raise InvalidParams("tool_choice", f"tool_choice {self.name or self.mode!r} is enforced with a "
                                "structured output, and the request sets its own")
        return params.clone(structured_outputs=constraint)

    def stream(self) -> ToolStream:
        """A fresh parser for one completion's text."""
        if self.mode == "none":
            return _NoTools()
        if self.mode == "function":
            return _NamedStream(self.name)  # type: ignore[arg-type]
        if self.mode == "required":
            return _RequiredStream()
        return FAMILIES[self.family][1]()

    def parse(self, text: str, finish_reason: str | None) -> ParsedOutput:
        """One finished completion's text as content and tool calls."""
        parser = self.stream()
        return merge_deltas(parser.feed(text) + parser.finish(finish_reason), finish_reason)


@dataclass(slots=True)
class ParsedOutput:
    content: str | None  # None when the output is only tool calls
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None  # 'tool_calls' when it stopped after calling tools


def merge_deltas(deltas: list[Delta], finish_reason: str | None) -> ParsedOutput:
    content = ""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        content += delta.get("content", "")
        for part in delta.get("tool_calls", []):
            if part["index"] == len(calls):
                calls.append({"id": part["id"], "type": "function", "function": dict(part["function"])})
            else:
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return ParsedOutput(content.strip() or None if calls else content, calls,
                        tool_finish_reason(finish_reason, bool(calls)))


def tool_finish_reason(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's 'tool_calls' for a completion that stopped after calling tools; 'length' stays 'length'."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


# --- validation ---

def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Each tool {"type": "function", "function": {"name", "description"?, "parameters"?}}, names unique."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidParams("tools", f"expected a list of tools, got {type(tools).__name__}")
    seen: set[str] = set()
    checked = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidParams(where, f"expected a map {{type: 'function', function: {{...}}}}, got {tool!r}")
        if tool.get("type", "function") != "function":
            raise InvalidParams(f"{where}.type", f"only 'function' tools are supported, got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidParams(f"{where}.function", "expected a map with name, description and parameters")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidParams(f"{where}.function.name", f"required: a non-empty string, got {name!r}")
        if name in seen:
            raise InvalidParams(f"{where}.function.name", f"another tool is already named {name!r}")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidParams(f"{where}.function.description", f"expected a string, got {description!r}")
        parameters = function.get("parameters")
        if parameters is not None:
            try:
                parameters = json.loads(check_schema(parameters))
            except InvalidParams as e:
                raise InvalidParams(f"{where}.function.parameters", e.message) from None
        checked.append({"type": "function", "function": {k: v for k, v in (
            ("name", name), ("description", description), ("parameters", parameters)) if v is not None}})
    return checked


def check_tool_choice(tool_choice: Any, tools: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(mode, named tool): 'auto' (the default with tools), 'none' (the default without), 'required', or
    ('function', name) for {"type": "function", "function": {"name": ...}} naming one of the tools."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in MODES:
            raise InvalidParams("tool_choice", f"expected one of {', '.join(MODES)} or a named function, got "
                                f"{tool_choice!r}")
        if tool_choice != "none" and not tools:
            raise InvalidParams("tool_choice", f"tool_choice {tool_choice!r} needs tools")
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):  # type: ignore[union-attr]
        raise InvalidParams("tool_choice", "expected 'auto', 'none', 'required' or {type: 'function', function: "
                            f"{{name: ...}}}}, got {tool_choice!r}")
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise InvalidParams("tool_choice", f"no tool named {name!r} in tools ({', '.join(names) or 'none given'})")
    return "function", name


# --- templates that know nothing of tools ---

def messages_for_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          template: str | None) -> tuple[list[dict[str, Any]], bool]:
    """The messages to render, and whether to hand the template `tools`. A template that renders tools itself
    (Qwen2.5's) gets everything as is. One that does not (SmolLM2's: it only prints role and content) would drop
    the tools and fail on an assistant turn with null content, so the hermes format is written into the messages:
    the tools into the system message, each assistant tool call as a <tool_call> block, each tool result as a
    <tool_response> block."""
    template = template or ""
    if "tools" in template and "tool_calls" in template:
        return messages, bool(tools)
    rendered = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            blocks = [f"{OPEN}\n{json.dumps(_call_json(c), ensure_ascii=False)}\n{CLOSE}"
                      for c in message.pop("tool_calls")]
            message["content"] = "\n".join(filter(None, [message.get("content"), *blocks]))
        if message.get("role") == "tool":
            message["content"] = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
        message.setdefault("content", "")
        if message["content"] is None:
            message["content"] = ""
        rendered.append(message)
    if tools:
        if rendered and rendered[0].get("role") == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{tools_prompt(tools)}"}
        else:
            rendered.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return rendered, False


def _call_json(call: Any) -> dict[str, Any]:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        pass  # kept as the text the caller sent
    return {"name": function.get("name"), "arguments": arguments}


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The hermes system prompt (as Qwen2.5's template writes it) for templates without one."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each "
            "function call, return a json object with function name and arguments within <tool_call></tool_call> "
            'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
