"""The HTTP endpoints. Each is thin: parsing is protocol.py's, admission state.py's, shaping completions.py's and
chat.py's; everything reaches the engine through the service (backend.py)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request, WebSocket
from starlette.responses import JSONResponse, Response

from lmport.bridge.http import metrics as metrics_module
from lmport.bridge.http.chat import create_chat_completion
from lmport.bridge.http.completions import create_completion
from lmport.bridge.http.errors import bad_request, from_engine_error
from lmport.bridge.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    template_messages,
)
from lmport.bridge.http.state import ServerState
from lmport.bridge.http.websocket import chat_socket
from lmport.engine import __version__

router = APIRouter()


def get_state(request: Request) -> ServerState:
    return request.app.state.lmport


def authenticated(request: Request) -> str:
    """Bearer auth (when keys are configured); the caller's rate-limit identity."""
    return get_state(request).identity(request)


@router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> JSONResponse:
    status = "ok" if state.ready else ("error" if state.load_error else "loading")
    body = {"status": status, "model": state.model_names[0], "ready": state.ready}
    if state.load_error:
        body["error"] = state.load_error
    if len(state.models) > 1:
        body["models"] = {served.names[0]: {"ready": served.ready, "error": served.load_error}
                          for served in state.models}
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/v1/models")
async def models(state: ServerState = Depends(get_state), _: str = Depends(authenticated)) -> dict:
    base = await state.listing()
    first = base[0]
    adapters = [{**first, "id": name, "root": lora["lora_path"], "parent": first["id"]}
                for name, lora in state.adapters.items()]  # vLLM's shape: the adapter's path, its base model
    return {"object": "list", "data": base + adapters}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state),
                      identity: str = Depends(authenticated)) -> Response:
    return await create_completion(body, request, state, identity)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state),
                           identity: str = Depends(authenticated)) -> Response:
    return await create_chat_completion(body, request, state, identity)


@router.websocket("/v1/chat/completions")
async def chat_websocket(ws: WebSocket) -> None:
    await chat_socket(ws, ws.app.state.lmport)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: ServerState = Depends(get_state),
                   _: str = Depends(authenticated)) -> dict:
    _, state = await state.route(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("prompt", "give exactly one of prompt (text) or messages (a chat)")
    if body.messages is not None:
        tokens = await state.chat_prompt(template_messages(body.messages), body.chat_template,
                                         body.add_generation_prompt)
    else:
        try:
            tokens = await asyncio.to_thread(state.backend.tokenize, body.prompt, body.add_special_tokens)
        except Exception as exc:  # noqa: BLE001
            raise from_engine_error(exc) from None
    return {"count": len(tokens), "max_model_len": state.backend.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: ServerState = Depends(get_state),
                     _: str = Depends(authenticated)) -> dict:
    _, state = await state.route(body.model)
    try:
        text = await asyncio.to_thread(state.backend.detokenize, body.tokens)
    except Exception as exc:  # noqa: BLE001
        raise from_engine_error(exc, {"token_ids": "tokens"}) from None
    return {"prompt": text}


@router.get("/metrics")
async def prometheus(state: ServerState = Depends(get_state)) -> Response:
    return Response(await asyncio.to_thread(state.metrics.render), media_type=metrics_module.CONTENT_TYPE)


@router.get("/stats")
async def stats(state: ServerState = Depends(get_state)) -> dict:
    """The service's counters and the engine's (JSON)."""
    return {"ready": state.ready, "uptime_s": time.time() - state.started,
            **(await asyncio.to_thread(state.backend.service_stats))}
