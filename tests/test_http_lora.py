"""LoRA over HTTP, with the official openai SDK on a real socket: `lora_modules` (vLLM's --lora-modules) serves
adapters under their own model names, /v1/models lists them with their base model as parent, and a request naming
one runs under it."""

from __future__ import annotations


import openai
import pytest

from lmport.bridge.http.backend import ServiceBackend
from lmport.bridge.http.config import load_settings
from lmport.bridge.http.server import RunningServer
from lmport.engine.errors import InvalidParams
from tests.http_helpers import TEST_ENGINE
from tests.make_lora_adapter import make_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapter = make_adapter(tmp_path_factory.mktemp("lora") / "smol-adapter")
    settings = load_settings({"port": 0, "uvicorn_log_level": "warning", **TEST_ENGINE, "enable_lora": True,
                              "max_lora_rank": 8, "lora_modules": [f"smol-tuned={adapter}"]}, environ={})
    running = RunningServer(settings, ServiceBackend(settings.engine)).wait_ready()
    yield running, adapter
    running.stop()


def test_models_lists_the_adapter_under_its_base(server) -> None:
    running, adapter = server
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2", "smol-tuned"}
    assert models["smol-tuned"].parent == "smollm2" and models["smol-tuned"].root == str(adapter)
    assert models["smollm2"].parent is None


def test_a_request_naming_the_adapter_runs_under_it(server) -> None:
    running, _ = server
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
    ask = dict(prompt="The capital of France is", max_tokens=12, temperature=0)
    base = client.completions.create(model="smollm2", **ask)
    tuned = client.completions.create(model="smol-tuned", **ask)
    assert tuned.model == "smol-tuned" and tuned.choices[0].text != base.choices[0].text
    chat = client.chat.completions.create(model="smol-tuned", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.model == "smol-tuned" and chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", **ask)


def test_lora_modules_need_enable_lora_and_name_equals_path() -> None:
    with pytest.raises(InvalidParams, match="needs enable_lora") as err:
        load_settings({"lora_modules": ["a=/x"]}, environ={})
    assert err.value.field == "lora_modules"
    with pytest.raises(InvalidParams, match="expected name=path"):
        load_settings({"lora_modules": ["just-a-name"], "enable_lora": True}, environ={})
