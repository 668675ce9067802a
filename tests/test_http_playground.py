"""The chat playground at `/`: its files are served (and shipped in the wheel), and in a real headless Chromium a
person's session works against the bundled model: the page asks for the server's API key, lists the models, streams
a reply with tokens/s, and Stop aborts the engine request (the server's running requests drop to 0)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import httpx
import pytest

from lmport.bridge.http.playground import STATIC
from tests.browser import Browser
from tests.http_helpers import engine_stats, fake_server, model_server, wait_idle

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(tempfile.gettempdir()) / "lmport-artifacts"
STATIC_FILES = sorted(p.name for p in STATIC.iterdir())


def test_page_and_modules_are_served_without_a_key() -> None:
    running, _ = fake_server(api_key=["k"])
    try:
        running.wait_ready()
        page = httpx.get(f"{running.url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/playground/playground.js">' in page.text
        for name, kind in (("playground.js", "text/javascript"), ("api.js", "text/javascript"),
                           ("playground.css", "text/css")):
            response = httpx.get(f"{running.url}/playground/{name}")
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind), name
        assert httpx.get(f"{running.url}/v1/models").status_code == 401  # what the page then asks a key for
    finally:
        running.stop()


@pytest.mark.slow
def test_the_wheel_ships_the_static_files(tmp_path) -> None:
    """Built from a copy of the sources (the build writes build/ and egg-info beside them)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "lmport", source / "lmport", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("lmport-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lmport/bridge/http/static/{name}" for name in STATIC_FILES} <= names, sorted(names)


KEY = "playground-key"


@pytest.fixture(scope="module")
def server():
    running = model_server(api_key=[KEY])
    yield running
    running.stop()


def artifact(browser: Browser, tmp_path: Path, name: str, capsys) -> Path:
    """The screenshot under the test's tmp dir, copied where it outlives the run; the path is printed."""
    shot = browser.screenshot(tmp_path / name)
    ARTIFACTS.mkdir(exist_ok=True)
    kept = Path(shutil.copy(shot, ARTIFACTS / name))
    with capsys.disabled():
        print(f"\nplayground screenshot: {kept}")
    return kept


TRANSCRIPT = "[...document.querySelectorAll('#transcript li')].map(li => [li.className, li.textContent])"


@pytest.mark.slow
def test_a_chat_streams_and_stop_aborts_it_in_the_engine(server, tmp_path, capsys) -> None:
    with Browser(tmp_path / "profile") as browser:
        browser.open(f"{server.url}/")
        browser.wait_for("document.getElementById('key-dialog').open")  # /v1/models answered 401
        artifact(browser, tmp_path, "playground-key.png", capsys)
        browser.type("#key-input", KEY)
        browser.click("#key-save")
        assert browser.wait_for("[...document.getElementById('model').options].map(o => o.value).join()") == \
            "smollm2"
        assert browser.evaluate("sessionStorage.getItem('lmport.apiKey')") == KEY

        browser.type("#system", "You are a storyteller.")
        browser.type("#max-tokens", "1500")
        before = wait_idle(server)
        browser.type("#prompt", "Tell me a long story about a lighthouse.")
        browser.click("#send")
        browser.wait_for("document.querySelector('#transcript li.assistant').textContent.length > 40", 120)
        assert engine_stats(server)["num_running"] == 1
        rate = browser.wait_for("document.getElementById('stats').textContent")
        assert "tok/s" in rate and float(rate.split("·")[1].split()[0]) > 0, rate
        artifact(browser, tmp_path, "playground-streaming.png", capsys)

        browser.click("#stop")
        stats = wait_idle(server)  # running requests back to 0, every KV block free
        assert stats["num_running"] == 0 and stats["requests_aborted"] == before["requests_aborted"] + 1
        assert stats["generation_tokens_total"] - before["generation_tokens_total"] < 1500 / 3
        assert browser.wait_for("document.getElementById('status').dataset.state") == "stopped"
        [(_, question), (kind, partial)] = browser.evaluate(TRANSCRIPT)
        assert question == "Tell me a long story about a lighthouse." and "stopped" in kind and partial

        # the next turn runs to its end, and its rate is counted from the server's usage
        browser.type("#max-tokens", "8")
        browser.type("#prompt", "Thanks!")
        browser.press_enter()
        assert browser.wait_for("document.getElementById('status').dataset.state === 'done' && "
                                "document.getElementById('status').dataset.state", 120) == "done"
        assert len(browser.evaluate(TRANSCRIPT)) == 4
        assert browser.evaluate("document.getElementById('stats').textContent").split()[0] in {str(n) for n in
                                                                                            range(1, 9)}
        artifact(browser, tmp_path, "playground-done.png", capsys)
        assert browser.errors == []
