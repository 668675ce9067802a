"""Tool calling: the hermes parser (whole and streamed), tools/tool_choice validation, the constraint that enforces
tool_choice, templates without tool support, and LLM.chat with tools on the bundled model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from lmport.engine.errors import InvalidParams
from lmport.engine.sampling_params import SamplingParams
from lmport.engine.tool_calls import ToolCalling, family_for_template, merge_deltas, messages_for_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')


def auto() -> ToolCalling:
    calling = ToolCalling.from_request([WEATHER, TIME])
    assert calling is not None and calling.mode == "auto"
    return calling


def test_parse_several_calls_and_content() -> None:
    parsed = auto().parse(TEXT, "stop")
    assert parsed.content == "Let me check."
    assert parsed.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(parsed.tool_calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert parsed.tool_calls[1]["function"]["arguments"] == "{}"
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == 2


def test_parse_is_lenient() -> None:
    calling = auto()
    plain = calling.parse("no calls here", "stop")
    assert (plain.content, plain.tool_calls, plain.finish_reason) == ("no calls here", [], "stop")
    broken = calling.parse('Hi <tool_call>{"name": oops}</tool_call>', "stop")
    assert broken.tool_calls == [] and broken.content == 'Hi <tool_call>{"name": oops}</tool_call>'
    unclosed = calling.parse('<tool_call>{"name": "get_time", "arguments": {}}', "stop")  # stopped at EOS
    assert unclosed.content is None and unclosed.tool_calls[0]["function"]["name"] == "get_time"
    truncated = calling.parse('<tool_call>{"name": "get_weather", "argu', "length")
    assert truncated.tool_calls == [] and truncated.finish_reason == "length"


@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_deltas_merge_to_the_whole_parse(step: int) -> None:
    stream = auto().stream()
    deltas = []
    for i in range(0, len(TEXT), step):
        deltas += stream.feed(TEXT[i:i + step])
    deltas += stream.finish("stop")
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    first = calls[0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"]["name"] == "get_weather"
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:]
               if c["index"] == 0)
    assert len([c for c in calls if c["index"] == 0]) > 2 or step == 7  # arguments arrive in fragments
    assert not any("<tool" in d.get("content", "") for d in deltas)
    merged = merge_deltas(deltas, "stop")
    whole = auto().parse(TEXT, "stop")
    assert merged.content == whole.content
    assert [json.loads(c["function"]["arguments"]) for c in merged.tool_calls] == \
        [json.loads(c["function"]["arguments"]) for c in whole.tool_calls]


def test_required_and_named_constraints_and_their_reading() -> None:
    required = ToolCalling.from_request([WEATHER, TIME], "required")
    schema = required.structured_outputs()["json"]
    good = [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    parsed = required.parse(json.dumps(good), "stop")
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_time"]
    assert parsed.content is None and parsed.finish_reason == "tool_calls"
    cut = required.parse('[{"name": "get_weather", "argu', "length")
    assert cut.tool_calls == [] and cut.finish_reason == "length"

    named = ToolCalling.from_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}})
    assert named.structured_outputs() == {"json": WEATHER["function"]["parameters"]}
    call = named.parse('{"city": "Rome"}', "stop").tool_calls[0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert named.constrain(SamplingParams()).structured_outputs.kind == "json"
    with pytest.raises(InvalidParams) as e:
        named.constrain(SamplingParams(structured_outputs={"regex": "a+"}))
    assert e.value.field == "tool_choice"


def test_tool_choice_none_neither_renders_nor_parses() -> None:
    calling = ToolCalling.from_request([WEATHER], "none")
    assert calling.template_tools is None and calling.structured_outputs() is None
    assert calling.parse(TEXT, "stop").content == TEXT


@pytest.mark.parametrize(("tools", "tool_choice", "field"), [
    ([{"type": "function", "function": {"description": "x"}}], None, "tools[0].function.name"),
    ([WEATHER, {"type": "function", "function": {"name": ""}}], None, "tools[1].function.name"),
    ([{"type": "retrieval"}], None, "tools[0].type"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None,
     "tools[0].function.parameters"),
    ("get_weather", None, "tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "always", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_validation_names_the_field(tools, tool_choice, field) -> None:
    with pytest.raises(InvalidParams) as e:
        ToolCalling.from_request(tools, tool_choice)
    assert e.value.field == field


def test_family_and_templates_without_tool_support() -> None:
    assert family_for_template("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert family_for_template(None) == "hermes"
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    rendered, pass_tools = messages_for_template(messages, [WEATHER], "{{ message['content'] }}")
    assert not pass_tools
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' == \
        rendered[2]["content"] and "tool_calls" not in rendered[2]
    assert rendered[3]["content"] == "<tool_response>\n18 C\n</tool_response>"
    same, pass_tools = messages_for_template(messages, [WEATHER], "{% for t in tools %}{{ m.tool_calls }}")
    assert same is messages and pass_tools


# --- on the bundled model ---

@pytest.fixture(scope="module")
def llm():
    from lmport.engine import LLM
    from tests.http_helpers import TEST_ENGINE

    with LLM(**TEST_ENGINE) as model:
        yield model


QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.slow
def test_chat_required_gives_valid_calls(llm) -> None:
    [result] = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=60), tools=[WEATHER, TIME],
                        tool_choice="required", use_tqdm=False)
    output = result.outputs[0]
    assert output.finish_reason == "stop" and output.tool_calls
    for call in output.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            tool["function"].get("parameters", {"type": "object"}))
    assert output.to_dict()["tool_calls"] == output.tool_calls


@pytest.mark.slow
def test_chat_named_tool_and_a_tool_result_round(llm) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    [result] = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=40), tools=[WEATHER, TIME],
                        tool_choice=choice, use_tqdm=False)
    [call] = result.outputs[0].tool_calls
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    conversation = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}]
    [reply] = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=8), tools=[WEATHER], use_tqdm=False)
    assert reply.outputs[0].finish_reason == "length" and reply.outputs[0].text
    prompt = llm.detokenize(reply.prompt_token_ids)
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in prompt and "get_weather" in prompt
    [plain] = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert plain.outputs[0].tool_calls is None and "tool_calls" not in plain.outputs[0].to_dict()


@pytest.mark.slow
def test_the_worker_returns_tool_calls_as_plain_data_whole_and_streamed() -> None:
    from lmport.bridge.protocol import BridgeError
    from tests.bridge_helpers import spawn_shim

    for client in spawn_shim():
        handle = client.llm("smollm2", kv_cache_memory_bytes=128 << 20, max_model_len=1024)
        params = {"temperature": 0, "max_tokens": 60}
        [whole] = client.chat(handle, QUESTION, params, tools=[WEATHER, TIME], tool_choice="required")
        calls = whole["outputs"][0]["tool_calls"]
        assert calls and all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
        for call in calls:
            tool = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                tool["function"].get("parameters", {"type": "object"}))
        chunks = list(client.chat(handle, QUESTION, params, tools=[WEATHER, TIME], tool_choice="required",
                                  stream=True))
        last = [o for c in chunks for o in c["outputs"] if o.get("finish_reason")][0]
        assert [c["function"] for c in last["tool_calls"]] == [c["function"] for c in calls]
        with pytest.raises(BridgeError) as err:
            client.chat(handle, QUESTION, params, tools=[WEATHER], tool_choice={"type": "function",
                                                                                 "function": {"name": "nope"}})
        assert err.value.code == "invalid_params" and err.value.details["field"] == "tool_choice"
