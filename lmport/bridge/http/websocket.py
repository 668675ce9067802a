"""WebSocket at /v1/chat/completions: send a chat request as a JSON message, receive its `chat.completion.chunk`
deltas as JSON messages, then `{"object": "chat.completion.done", "id", "usage"}`. Requests on one socket run one
after another; closing the socket mid-stream aborts the request in the engine. Errors arrive as `{"error": {...}}`
messages and the socket stays open (auth failures close it with 1008)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from lmport.bridge.http.chat import admit_chat
from lmport.bridge.http.errors import APIError, bad_request, from_engine_error, from_validation
from lmport.bridge.http.holds import holding
from lmport.bridge.http.protocol import ChatCompletionRequest
from lmport.bridge.http.state import ServerState

POLICY_VIOLATION = 1008


async def chat_socket(ws: WebSocket, state: ServerState) -> None:
    await ws.accept()
    try:
        identity = state.identity(ws)
    except APIError as exc:
        await ws.send_json(exc.body())
        await ws.close(POLICY_VIOLATION)
        return
    inbox: list[dict[str, Any]] = []  # messages that arrived while a request was streaming

    async def receive() -> dict[str, Any]:
        message = await ws.receive()
        if message["type"] == "websocket.receive":
            inbox.append(message)
        return message

    try:
        while True:
            message = inbox.pop(0) if inbox else await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            with holding():  # the message's model stays loaded while it streams, not for the socket's life
                if not await _answer(ws, message, state, identity, receive):
                    return
    except WebSocketDisconnect:
        return


async def _answer(ws: WebSocket, message: dict[str, Any], state: ServerState, identity: str,
                  receive: Callable[[], Awaitable[dict[str, Any]]]) -> bool:
    """Answer one request message; False once the client has gone."""
    try:
        body = _parse(message)
        view = await admit_chat(body, state, identity, receive)
    except Exception as exc:  # noqa: BLE001 — answer and keep the socket for the next request
        await ws.send_json(from_engine_error(exc).body())
        return True
    try:
        async for chunk in view.chunks(include_usage=False):
            await ws.send_json(chunk)
        if view.admitted.generation.client_gone:
            return False
        await ws.send_json({"object": "chat.completion.done", "id": view.admitted.request_id,
                            "usage": view.admitted.generation.usage.to_dict()})
    except WebSocketDisconnect:
        return False
    except Exception as exc:  # noqa: BLE001
        await ws.send_json(from_engine_error(exc, view.admitted.renames).body())
    finally:
        view.release()
    return True


def _parse(message: dict[str, Any]) -> ChatCompletionRequest:
    raw = message.get("text") if message.get("text") is not None else message.get("bytes")
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        raise bad_request(None, "each message must be one JSON chat completion request") from None
    if not isinstance(data, dict):
        raise bad_request(None, "each message must be a JSON object (a chat completion request)")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise from_validation(list(exc.errors())) from None
