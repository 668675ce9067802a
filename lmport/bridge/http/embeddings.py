"""POST /v1/embeddings (OpenAI's shape) and POST /v1/rerank (Cohere / Jina's shape, scored by embedding similarity).

Both go through the worker's `embed` method (backend.embed), so validation, error codes and batching are the
service's: on a decoder the inputs are prefilled beside running generations, on an encoder they run as one padded
batch. Inputs are tokenized here first, as the generation endpoints do, so the rate limiter is charged what runs.
"""

from __future__ import annotations

import asyncio
import base64
import re
import struct
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends

from lmport.bridge.http.errors import APIError, bad_request, from_engine_error
from lmport.bridge.http.protocol import TokenIds, _Strict
from lmport.bridge.http.routes import authenticated, get_state
from lmport.bridge.http.state import ServerState

router = APIRouter()


class EmbeddingRequest(_Strict):
    input: str | list[str] | TokenIds | list[TokenIds]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # lmport's extras (the worker's embed parameters)
    pooling: str = "mean"
    normalize: bool = True


class RerankRequest(_Strict):
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = True
    pooling: str = "mean"  # lmport's extra, as for embeddings


async def embed(state: ServerState, identity: str, inputs: list[str | list[int]], pooling: str, normalize: bool,
                dimensions: int | None) -> dict[str, Any]:
    """Tokenize, charge the rate limiter, and run the worker's embed on a thread; errors become 4xx naming the field.
    `state` is the one route() bound to the request's model."""
    if not inputs:
        raise bad_request("input", "input is empty: give at least one text or token-id list")
    token_ids = await state.prompt_ids(inputs)
    cost = sum(len(ids) for ids in token_ids)
    state.charge(identity, cost)
    try:
        return await asyncio.to_thread(state.backend.embed, token_ids, pooling, normalize, dimensions)
    except Exception as exc:  # noqa: BLE001 — validation failures answer 400 naming the field
        state.limiter.refund(identity, cost)
        raise from_engine_error(exc) from None


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: ServerState = Depends(get_state),
                     identity: str = Depends(authenticated)) -> dict:
    model, state = await state.route(body.model)
    inputs = _input_list(body.input)
    result = await embed(state, identity, inputs, body.pooling, body.normalize, body.dimensions)
    data = [{"object": "embedding", "index": item["index"], "embedding": _encode(item["embedding"],
                                                                                 body.encoding_format)}
            for item in result["data"]]
    return {"object": "list", "data": data, "model": model, "usage": result["usage"]}


@router.post("/v1/rerank")
async def rerank(body: RerankRequest, state: ServerState = Depends(get_state),
                 identity: str = Depends(authenticated)) -> dict:
    """Relevance = cosine similarity of the query's and each document's (normalized) embeddings, in [-1, 1]."""
    model, state = await state.route(body.model)
    if not body.documents:
        raise bad_request("documents", "documents is empty: give at least one document to rank")
    if body.top_n is not None and body.top_n < 1:
        raise bad_request("top_n", f"top_n must be at least 1, got {body.top_n}")
    try:
        result = await embed(state, identity, [body.query, *body.documents], body.pooling, True, None)
    except APIError as exc:
        raise _rename_inputs(exc) from None
    query, *documents = (item["embedding"] for item in result["data"])
    scores = [sum(q * d for q, d in zip(query, document)) for document in documents]
    ranked = sorted(range(len(documents)), key=lambda i: -scores[i])[:body.top_n]
    results = []
    for i in ranked:
        entry: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            entry["document"] = {"text": body.documents[i]}
        results.append(entry)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "created": int(time.time()), "results": results,
            "usage": result["usage"]}


def _input_list(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(t, int) for t in value):
        return [value]  # one token-id list
    return list(value)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """base64: the little-endian float32 bytes, as OpenAI sends them (its SDKs decode with numpy.frombuffer)."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _rename_inputs(exc: APIError) -> APIError:
    """An input error of a rerank call names the request's field: input[0] is the query, input[i] documents[i-1]."""
    old = exc.param or ""
    match = re.fullmatch(r"input\[(\d+)\]", old)
    if match is None:
        return exc
    new = "query" if match.group(1) == "0" else f"documents[{int(match.group(1)) - 1}]"
    return APIError(exc.status, exc.message.replace(old, new, 1), type=exc.type, param=new, code=exc.code,
                    headers=exc.headers)
