"""Models by hub id: a hub id missing from the local cache is downloaded with huggingface_hub from HF_ENDPOINT (here
a local fake hub, tests/hub_server.py), at a branch or a commit, with HF_TOKEN for a gated repo, and never when
HF_HUB_OFFLINE is set. Each load runs in a fresh process with its own environment, as a user's would (huggingface_hub
reads its settings at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bridge_helpers import REPO
from tests.hub_server import FakeHub, serve
from tests.model_harness import write_tiny_model_dir

pytestmark = pytest.mark.slow

MAIN, V1 = "a" * 40, "b" * 40

# loads `model` in a fresh process, generates 4 greedy tokens, prints {path, tokens} or {error, type, field}
LOAD_AND_GENERATE = """
import json, sys
from lmport.engine import LLM, SamplingParams
from lmport.engine.errors import LMPortError
try:
    llm = LLM(sys.argv[1], revision=sys.argv[2] or None, dtype="float32", kv_cache_memory_bytes=8 << 20)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    print(json.dumps({"path": str(llm.engine.model_path), "tokens": out[0].outputs[0].token_ids}))
    llm.shutdown()
except LMPortError as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__, "field": getattr(exc, "field", None)}))
"""


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    write_tiny_model_dir(tmp_path / "main", seed=0)
    write_tiny_model_dir(tmp_path / "v1", seed=1)
    for junk in ("pytorch_model.bin", "model.gguf"):  # never fetched: lmport reads safetensors only
        (tmp_path / "main" / junk).write_bytes(b"x" * 64)
    server, fake = serve(FakeHub())
    fake.add_model_dir("org/tiny", tmp_path / "main", MAIN)
    fake.add_model_dir("org/tiny", tmp_path / "v1", V1, branches=("v1",))
    fake.add_model_dir("org/gated", tmp_path / "main", MAIN, gated=True)
    yield fake
    server.shutdown()


def run(hub: FakeHub, tmp_path: Path, model: str, revision: str = "", **env: str) -> dict:
    environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
                   "HF_HUB_OFFLINE": "0", **env}
    if "HF_TOKEN" not in env:
        environment.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, model, revision], env=environment, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def test_download_then_generate_then_load_from_the_cache_without_the_server(hub: FakeHub, tmp_path: Path) -> None:
    first = run(hub, tmp_path, "org/tiny")
    assert first["path"].endswith(f"models--org--tiny/snapshots/{MAIN}") and len(first["tokens"]) == 4
    assert "downloading org/tiny (revision main)" in first["stderr"] and "Fetching" in first["stderr"]  # progress
    fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert not fetched & {"pytorch_model.bin", "model.gguf"}
    count = len(hub.requests)
    again = run(hub, tmp_path, "org/tiny")
    assert again["tokens"] == first["tokens"] and len(hub.requests) == count  # served from the cache


def test_a_revision_by_branch_and_by_commit(hub: FakeHub, tmp_path: Path) -> None:
    by_branch = run(hub, tmp_path, "org/tiny", "v1")
    by_commit = run(hub, tmp_path, "org/tiny", MAIN)
    assert by_branch["path"].endswith(V1) and by_commit["path"].endswith(MAIN)
    assert by_branch["tokens"] != by_commit["tokens"]  # two different models
    missing = run(hub, tmp_path, "org/tiny", "no-such-branch")
    assert missing["type"] == "InvalidParams" and missing["field"] == "revision"
    assert "'no-such-branch' is not a branch, tag or commit of 'org/tiny'" in missing["error"]


def test_offline_mode_never_contacts_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    refused = run(hub, tmp_path, "org/tiny", HF_HUB_OFFLINE="1")
    assert refused["type"] == "ModelNotFound" and "HF_HUB_OFFLINE is set" in refused["error"]
    assert hub.requests == []


def test_a_gated_repo_needs_hf_token_and_gets_it(hub: FakeHub, tmp_path: Path) -> None:
    denied = run(hub, tmp_path, "org/gated")
    assert denied["type"] == "ModelNotFound" and "gated" in denied["error"] and "HF_TOKEN" in denied["error"]
    allowed = run(hub, tmp_path, "org/gated", HF_TOKEN="hf_test_token")
    assert len(allowed["tokens"]) == 4
    assert any(auth == "Bearer hf_test_token" for _, _, auth in hub.requests)


def test_an_unknown_repo_is_a_clear_model_not_found(hub: FakeHub, tmp_path: Path) -> None:
    missing = run(hub, tmp_path, "org/absent")
    assert missing["type"] == "ModelNotFound" and "'org/absent' is not on the hub" in missing["error"]


def test_the_worker_downloads_for_its_llm_call(hub: FakeHub, tmp_path: Path) -> None:
    """Through the real worker process: the download's progress goes to stderr, never onto the protocol pipe."""
    from lmport.bridge.client import Client

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0"}
    with open(tmp_path / "stderr", "wb") as stderr:
        client = Client.spawn(cwd=str(REPO), env=env, stderr=stderr)
        try:
            handle = client.llm("org/tiny", dtype="float32", kv_cache_memory_bytes=8 << 20)
            out = client.generate(handle, {"prompt_token_ids": [5, 6, 7]},
                                  {"temperature": 0, "max_tokens": 4, "ignore_eos": True})
        finally:
            client.close()
    assert handle["model_path"].endswith(MAIN) and len(out[0]["outputs"][0]["token_ids"]) == 4
    assert "Fetching" in (tmp_path / "stderr").read_text()
