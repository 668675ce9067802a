"""The HTTP layer's pieces on their own: rate limiter, settings precedence, error mapping, request models,
logprob formats, metrics (no server, no model)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmport.bridge.http.config import load_settings
from lmport.bridge.http.errors import from_engine_error, validation_param
from lmport.bridge.http.logprobs import CompletionLogprobs, chat_logprobs
from lmport.bridge.http.metrics import ServerMetrics
from lmport.bridge.http.protocol import ChatCompletionRequest, CompletionRequest
from lmport.bridge.http.ratelimit import RateLimiter
from lmport.bridge.protocol import BridgeError
from lmport.bridge.service import Service
from lmport.engine.errors import InvalidParams, ModelNotFound, UnsupportedModel
from lmport.engine.llm import EngineDead


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- rate limiter ---

def test_requests_per_minute_bucket_refuses_then_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=None, clock=clock)
    assert all(limiter.acquire("a", 10).allowed for _ in range(3))
    refused = limiter.acquire("a", 10)
    assert not refused.allowed and refused.limit == "requests"
    assert refused.retry_after_s == pytest.approx(20.0)  # one request refills in 60/3 s
    assert limiter.acquire("b", 10).allowed  # buckets are per identity
    clock.now += 20.0
    assert limiter.acquire("a", 10).allowed
    assert not limiter.acquire("a", 10).allowed


def test_tokens_per_minute_reserve_and_refund() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600, clock=clock)
    assert limiter.acquire("k", 500).allowed
    refused = limiter.acquire("k", 200)
    assert not refused.allowed and refused.limit == "tokens"
    assert refused.retry_after_s == pytest.approx(10.0)  # 100 missing tokens at 10 tokens/s
    limiter.refund("k", 300)  # the first request used only 200 of its 500
    assert limiter.acquire("k", 200).allowed


def test_request_dearer_than_the_bucket_runs_against_a_full_bucket_and_leaves_debt() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=100, clock=clock)
    assert limiter.acquire("k", 1000).allowed
    refused = limiter.acquire("k", 1)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(901 / (100 / 60))


def test_rate_limiter_off_by_default() -> None:
    limiter = RateLimiter(None, None)
    assert not limiter.enabled and all(limiter.acquire("a", 10**9).allowed for _ in range(1000))


# --- settings: flags > LMPORT_* > YAML ---

def test_settings_precedence_flags_over_env_over_yaml(tmp_path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nmax-num-seqs: 7\nhost: 0.0.0.0\napi_key: [a, b]\ndtype: bfloat16\n")
    settings = load_settings({"config": str(config), "port": 9003},
                             environ={"LMPORT_PORT": "9002", "LMPORT_MAX_NUM_SEQS": "9", "LMPORT_API_KEY": "x,y"})
    assert settings.serve.port == 9003  # flag
    assert settings.engine["max_num_seqs"] == 9  # env over YAML
    assert settings.serve.api_key == ["x", "y"]  # env, comma-separated
    assert settings.serve.host == "0.0.0.0" and settings.engine["dtype"] == "bfloat16"  # YAML
    assert settings.model_names == ["smollm2"]


def test_serve_flags_are_derived_from_the_settings() -> None:
    from lmport.bridge.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--port", "8123", "--api-key", "a", "--api-key", "b",
                                             "--max-num-seqs", "4", "--no-enable-prefix-caching",
                                             "--max-model-len", "none", "--rate-limit-tpm", "500"])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "module", "log_level")}
    settings = load_settings(flags, environ={"LMPORT_PORT": "9"})
    assert settings.serve.port == 8123 and settings.serve.api_key == ["a", "b"]
    assert settings.serve.rate_limit_tpm == 500 and settings.serve.rate_limit_rpm is None
    assert settings.engine == {"max_num_seqs": 4, "enable_prefix_caching": False, "max_model_len": None}


def test_settings_errors_name_the_setting(tmp_path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("max_num_seq: 3\n")
    with pytest.raises(InvalidParams, match="did you mean 'max_num_seqs'") as err:
        load_settings({"config": str(config)}, environ={})
    assert err.value.field == "max_num_seq"
    with pytest.raises(InvalidParams) as err:
        load_settings({}, environ={"LMPORT_RATE_LIMIT_RPM": "lots"})
    assert err.value.field == "rate_limit_rpm"
    with pytest.raises(InvalidParams) as err:
        load_settings({"dtype": "float8"}, environ={})
    assert err.value.field == "dtype"
    with pytest.raises(InvalidParams) as err:
        load_settings({"port": 70000}, environ={})
    assert err.value.field == "port"
    with pytest.raises(InvalidParams, match="expected a list of str") as err:
        load_settings({"api_key": ["a", 1]}, environ={})
    assert err.value.field == "api_key"
    with pytest.raises(InvalidParams, match="expected str") as err:
        load_settings({"host": None}, environ={})
    assert err.value.field == "host"


# --- errors ---

def test_service_errors_map_to_http_status_and_request_param() -> None:
    error = from_engine_error(BridgeError("invalid_params", "sampling_params.max_tokens: must be >= 1",
                                          {"field": "sampling_params.max_tokens"}),
                              {"max_tokens": "max_completion_tokens"})
    assert (error.status, error.param) == (400, "max_completion_tokens")
    assert error.message.startswith("max_completion_tokens:")
    error = from_engine_error(BridgeError("invalid_params", "prompts[1]: bad", {"field": "prompts[1]"}),
                              {"prompts": "prompt"})
    assert error.param == "prompt[1]"
    assert from_engine_error(InvalidParams("temperature", "too hot")).param == "temperature"
    assert from_engine_error(BridgeError("out_of_memory", "never fits")).status == 413
    assert from_engine_error(BridgeError("out_of_memory", "never fits"), {"prompts": "messages"}).param == "messages"
    unavailable = from_engine_error(BridgeError("shutting_down", "bye"))
    assert unavailable.status == 503 and "Retry-After" in unavailable.headers
    assert from_engine_error(RuntimeError("boom")).status == 500
    body = from_engine_error(InvalidParams("n", "bad")).body()
    assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("exc, status, code, param", [
    (UnsupportedModel("no native implementation of FooForCausalLM"), 400, "invalid_params", "model"),
    (EngineDead("step failed"), 500, "engine_error", None),
    (MemoryError(), 413, "out_of_memory", "prompt"),
    (ModelNotFound("no model 'x'"), 404, "model_not_found", "model"),
])
def test_engine_errors_map_through_http_as_through_the_service(exc, status, code, param) -> None:
    direct = from_engine_error(exc)
    via_service = from_engine_error(Service().to_bridge_error(exc))
    assert (direct.status, direct.code, direct.param) == (status, code, param)
    assert direct.body() == via_service.body() and direct.status == via_service.status


def test_validation_locations_become_dotted_params() -> None:
    assert validation_param(("body", "messages", 0, "content")) == "messages[0].content"
    assert validation_param(("body", "prompt", "list[int]", 2)) == "prompt[2]"
    assert validation_param(("body",)) is None


# --- request models ---

def test_completion_request_prompt_forms_and_sampling_fields() -> None:
    assert CompletionRequest(prompt="hi").prompts() == ["hi"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    fields = CompletionRequest(prompt="x", logprobs=2, echo=True, top_k=5, logit_bias={"7": 1.0}).sampling()
    assert fields == {"n": 1, "top_k": 5, "logit_bias": {"7": 1.0}, "max_tokens": 16, "logprobs": 2,
                      "prompt_logprobs": 2}
    with pytest.raises(Exception, match="best_of"):
        CompletionRequest(prompt="x", best_of=3).sampling()
    with pytest.raises(Exception, match="stream_options"):
        CompletionRequest(prompt="x", stream_options={"include_usage": True}).sampling()


def test_chat_request_maps_openai_names_onto_sampling_params() -> None:
    body = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}],
                                 max_completion_tokens=9, logprobs=True, top_logprobs=3)
    fields, renames = body.sampling()
    assert fields["max_tokens"] == 9 and fields["logprobs"] == 3
    assert renames == {"max_tokens": "max_completion_tokens", "logprobs": "top_logprobs"}
    assert body.template_messages() == [{"role": "user", "content": "a\nb"}]
    with pytest.raises(Exception) as err:
        ChatCompletionRequest(messages=[{"role": "user", "content": "a"}], top_logprobs=2).sampling()
    assert err.value.param == "top_logprobs"


# --- logprob formats ---

POSITION = [{"token_id": 5, "logprob": -0.5, "rank": 2, "decoded_token": "b"},
            {"token_id": 4, "logprob": -0.1, "rank": 1, "decoded_token": "a"},
            {"token_id": 6, "logprob": float("-inf"), "rank": 3, "decoded_token": "c"}]


def test_completion_logprobs_offsets_continue_and_include_the_sampled_token() -> None:
    builder = CompletionLogprobs(top_n=1, decode=lambda t: f"<{t}>", text_offset=3)
    first = builder.build([5], [POSITION])
    assert first == {"tokens": ["b"], "token_logprobs": [-0.5], "top_logprobs": [{"a": -0.1, "b": -0.5}],
                     "text_offset": [3]}
    second = builder.build([9], [None])  # a prompt position without logprobs
    assert second["tokens"] == ["<9>"] and second["token_logprobs"] == [None] and second["text_offset"] == [4]


def test_chat_logprobs_are_ranked_top_k_with_bytes_and_finite() -> None:
    content = chat_logprobs([4], [POSITION], 3, decode=str)["content"]
    assert content[0]["token"] == "a" and content[0]["bytes"] == [97]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["a", "b", "c"]
    assert content[0]["top_logprobs"][2]["logprob"] == -9999.0


# --- metrics ---

def test_metrics_exposition_parses_and_counts() -> None:
    stats = {"num_running": 2, "num_waiting": 1, "kv_cache_usage": 0.25, "prompt_tokens_total": 40,
             "generation_tokens_total": 9, "prefix_cache_queries": 32, "prefix_cache_hits": 16}
    metrics = ServerMetrics("m", lambda: stats)
    metrics.observe_finished({"arrival_time": 1.0, "first_scheduled_time": 1.1, "first_token_time": 1.5,
                              "finished_time": 3.0}, ["stop", "length"])
    metrics.observe_itl(0.2, tokens=2)
    samples = {s.name + str(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}
    assert samples["lmport:num_requests_running[('model_name', 'm')]"] == 2
    assert samples["lmport:prompt_tokens_total[('model_name', 'm')]"] == 40
    assert samples["lmport:prefix_cache_hits_total[('model_name', 'm')]"] == 16
    assert samples["lmport:request_success_total[('finished_reason', 'stop'), ('model_name', 'm')]"] == 1
    assert samples["lmport:time_to_first_token_seconds_sum[('model_name', 'm')]"] == pytest.approx(0.5)
    assert samples["lmport:e2e_request_latency_seconds_sum[('model_name', 'm')]"] == pytest.approx(2.0)
    assert samples["lmport:request_queue_time_seconds_sum[('model_name', 'm')]"] == pytest.approx(0.1)
    assert samples["lmport:inter_token_latency_seconds_count[('model_name', 'm')]"] == 2
