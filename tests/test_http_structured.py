"""Structured outputs and tool calls over the OpenAI-compatible server on the bundled model, driven by the official
`openai` SDK unchanged: response_format (json_object, json_schema), `chat.completions.parse` with a pydantic model,
vLLM's structured_outputs extra field, tools with every tool_choice, streamed tool-call deltas, and the 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pydantic
import pytest

from tests.test_http_openai import client, server  # noqa: F401  (the module-scoped server and SDK client)

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population: int = pydantic.Field(ge=0, le=100_000_000)


def test_response_format_json_schema_and_json_object(client) -> None:
    schema = City.model_json_schema()
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}], temperature=0,
        max_tokens=80, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                                                 "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    anything = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris as a JSON object."}], temperature=0,
        max_tokens=100, response_format={"type": "json_object"},
        extra_body={"structured_outputs": None})
    text = anything.choices[0].message.content
    assert text.lstrip().startswith("{")
    assert anything.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict)


def test_sdk_parse_gives_the_pydantic_object(client) -> None:
    reply = client.chat.completions.parse(model="smollm2", messages=[{"role": "user", "content": "Describe Rome."}],
                                          response_format=City, temperature=0, max_tokens=80)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.population >= 0


def test_structured_outputs_extra_field_on_both_endpoints(client) -> None:
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Is fire hot?"}],
                                          temperature=0, max_tokens=5,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert chat.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(model="smollm2", prompt="Call me at", temperature=0.7, seed=3,
                                           max_tokens=12, extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert completion.choices[0].text[3] == "-" and completion.choices[0].text.replace("-", "").isdigit()


def test_cut_short_reports_length(client) -> None:
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris."}], temperature=0, max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    assert reply.choices[0].finish_reason == "length"


def test_tool_choice_required_and_named_give_valid_calls(client) -> None:
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                               tool_choice=tool_choice, temperature=0, max_tokens=80)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls and calls[0].id.startswith("call_") and calls[0].type == "function"
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(tool_choice, dict):
            assert [c.function.name for c in calls] == ["get_weather"]


def test_streamed_tool_calls_accumulate_in_the_sdk(client) -> None:
    with client.chat.completions.stream(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER],
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        temperature=0, max_tokens=80) as stream:
        chunks = [event for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    first = next(c.chunk.choices[0].delta.tool_calls[0] for c in chunks if c.chunk.choices
                 and c.chunk.choices[0].delta.tool_calls)
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.id == first.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_auto_keeps_plain_text_as_content_and_a_tool_loop_round_trips(client) -> None:
    auto = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                          tools=[WEATHER], temperature=0, max_tokens=20)
    message = auto.choices[0].message
    assert (message.tool_calls and auto.choices[0].finish_reason == "tool_calls") or \
        (message.content and auto.choices[0].finish_reason in ("stop", "length"))
    called = client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER],
                                            tool_choice="required", temperature=0, max_tokens=80)
    call = called.choices[0].message.tool_calls[0]
    follow_up = [*ASK_WEATHER, called.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model="smollm2", messages=follow_up, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"guided_json": {"type": "object"}}, "guided_json"),  # vLLM's retired extras are refused, not ignored
])
def test_bad_input_is_a_400_naming_the_field(server, body, param) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"messages": ASK_WEATHER, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
