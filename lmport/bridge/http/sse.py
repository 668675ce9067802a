"""Server-sent events as OpenAI streams them: `data: <json>\n\n` per chunk and `data: [DONE]\n\n` at the end."""

from __future__ import annotations

import json
from typing import Any

DONE = b"data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering the stream


def event(obj: Any, name: str | None = None) -> bytes:
    """`data: <json>`, preceded by `event: <name>` for a named event (EventSource dispatches it by that name)."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
