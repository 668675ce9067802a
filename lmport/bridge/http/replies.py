"""What both generation endpoints do with an admitted generation, once: the whole reply (collect, release, 499 when
the client left, else JSON) or the SSE stream (chunks, an error event if the generation failed after the headers,
release, `[DONE]`), and the parts every reply shares (the envelope, per-token decoding, the usage chunk)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from lmport.bridge.http import sse
from lmport.bridge.http.errors import from_engine_error
from lmport.bridge.http.state import Admitted, ServerState

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but access logs show what happened


def has_news(out: dict[str, Any]) -> bool:
    """A delta worth a chunk: text, tokens (text may lag behind them) or the finish."""
    return bool(out["text"] or out["token_ids"] or out.get("finish_reason"))


class Reply:
    """One endpoint's JSON for an admitted generation; subclasses give `whole` and `deltas`."""

    kind = ""  # the whole reply's `object`
    chunk_kind = ""  # each streamed chunk's
    stream_end: bytes | None = sse.DONE  # what closes a stream that ran to its end

    def __init__(self, model: str, admitted: Admitted, state: ServerState) -> None:
        self.model = model
        self.admitted = admitted
        self.state = state

    def decode(self, token_id: int) -> str:
        return self.state.backend.detokenize([token_id])

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.admitted.request_id, "object": kind, "created": self.admitted.created,
                "model": self.model, "choices": choices}

    def whole(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole reply from `Generation.collect()`'s results."""
        raise NotImplementedError

    def deltas(self) -> AsyncIterator[dict[str, Any]]:
        """The streamed chunks (envelopes), as the generation's chunks arrive."""
        raise NotImplementedError

    async def chunks(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """`deltas()`, then (include_usage) a usage chunk with no choices, before which every chunk says
        `usage: null`. The caller must release()."""
        usage_field = {"usage": None} if include_usage else {}
        async for chunk in self.deltas():
            yield {**chunk, **usage_field}
        generation = self.admitted.generation
        if include_usage and not generation.client_gone:
            yield {**self.envelope(self.chunk_kind, []), "usage": generation.usage.to_dict()}

    def encode(self, chunk: dict[str, Any]) -> bytes:
        """One streamed chunk as an SSE event."""
        return sse.event(chunk)

    def release(self) -> None:
        self.state.release(self.admitted)


async def respond(reply: Reply, stream: bool, include_usage: bool) -> Response:
    if stream:
        return StreamingResponse(_events(reply, include_usage), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    generation = reply.admitted.generation
    try:
        results = await generation.collect()
    finally:
        reply.release()
    if generation.client_gone:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(reply.whole(results))


async def _events(reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in reply.chunks(include_usage):
            yield reply.encode(chunk)
        if reply.admitted.generation.client_gone:
            return
    except Exception as exc:  # noqa: BLE001 — headers are gone: the error travels as an event
        yield sse.event(from_engine_error(exc, reply.admitted.renames).body())
    finally:
        reply.release()
    if reply.stream_end:
        yield reply.stream_end
