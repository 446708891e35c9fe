"""The HTTP side of `tunelab serve` (FastAPI): OpenAI's /v1/models, /v1/chat/completions and /v1/completions, streamed
as server-sent events or not; tunelab's /tunelab/render (the exact prompt a request makes); the chat page at /.

Every refusal is an OpenAI error body; a request that fails never takes the server down. The worker logs one line per request (batcher.log_request)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tunelab.serve.batcher import Batcher, Job, QueueFull
from tunelab.serve.pool import ModelPool, Served
from tunelab.serve.prompts import Prompt, render
from tunelab.serve.protocol import ApiError, ChatRequest, CompletionRequest, validation_error

log = logging.getLogger("tunelab.serve")
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def _served(pool: ModelPool, name: str) -> Served:
    served = pool.get(name)
    if served is None:
        raise ApiError(404, f"the model '{name}' is not served here; served models: {', '.join(pool.names)}.",
                       "model", code="model_not_found")
    return served


def _job(batcher: Batcher, served: Served, body: ChatRequest | CompletionRequest, prompt: Prompt) -> Job:
    job = Job(served, prompt.ids, prompt.max_tokens, body.temperature, body.top_p, body.seed, body.stop_list,
              asyncio.get_running_loop())
    try:
        batcher.submit(job)
    except QueueFull:
        raise ApiError(503, f"the server is busy ({batcher.max_waiting} requests waiting): retry shortly.",
                       kind="server_busy", headers={"Retry-After": "1"}) from None
    return job


def _usage(prompt: Prompt, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": len(prompt.ids), "completion_tokens": completion_tokens,
            "total_tokens": len(prompt.ids) + completion_tokens}


class _Shapes:
    """The response and chunk bodies of one endpoint (chat or text completions)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def full(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice]}
        return {**self._head("text_completion"), "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                                              "logprobs": None}]}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            return {**self._head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": finish, "logprobs": None}]}
        return {**self._head("text_completion"), "choices": [{"index": 0, "text": text or "", "finish_reason": finish,
                                                              "logprobs": None}]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage}


def _sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def _stream(job: Job, prompt: Prompt, body: ChatRequest | CompletionRequest, shapes: _Shapes
                  ) -> AsyncIterator[str]:
    """SSE chunks as the worker sends text; the client leaving (the generator closed) cancels the job's row."""
    outcome = "disconnected"
    try:
        if shapes.chat:
            yield _sse(shapes.chunk("", None, first=True))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _sse(shapes.chunk(value, None))
            elif kind == "error":
                outcome = "error"
                yield _sse(ApiError(500, value, kind="server_error").body())
                break
            else:
                _, finish, completion_tokens = value
                outcome = "done"
                yield _sse(shapes.chunk(None, finish))
                if body.include_usage:
                    yield _sse(shapes.usage_chunk(_usage(prompt, completion_tokens)))
                break
        yield _sse("[DONE]")
    finally:
        if outcome == "disconnected":  # the worker ends the row and logs it
            job.cancelled.set()


async def _wait(job: Job, request: Request) -> tuple[str, Any]:
    """The job's final event (the text events are joined into it), polling for a client that left."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return "disconnected", None
            continue
        if kind in ("done", "error"):
            return kind, value


async def _complete(request: Request, body: ChatRequest | CompletionRequest) -> Any:
    app = request.app
    chat = isinstance(body, ChatRequest)
    served = _served(app.state.pool, body.model)
    prompt = await asyncio.to_thread(_render_locked, app, served, body)
    job = _job(app.state.batcher, served, body, prompt)
    shapes = _Shapes(chat, served.name)
    if body.stream:
        return StreamingResponse(_stream(job, prompt, body, shapes), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    kind, value = await _wait(job, request)
    if kind == "disconnected":
        return JSONResponse({}, status_code=499)  # nobody reads it: nginx's code for a client that closed
    if kind == "error":
        raise ApiError(500, value, kind="server_error")
    result, finish, completion_tokens = value
    out = {**shapes.full(result.text, finish), "usage": _usage(prompt, completion_tokens)}
    if body.return_prompt:
        out["tunelab"] = {"prompt": prompt.text, "prompt_ids": prompt.ids}
    return out


def _render_locked(app: FastAPI, served: Served, body: ChatRequest | CompletionRequest) -> Prompt:
    with app.state.pool.tokenizer_lock:
        return render(served, body)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 500:
            log.warning(f"serve: {exc.status} {exc.message}")
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind="invalid_request_error").body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("serve: request failed")
        return JSONResponse(ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body(),
                            status_code=500)


def create_app(pool: ModelPool, max_batch: int = 32, max_waiting: int = 64) -> FastAPI:
    """The server's application over `pool`; its worker thread starts and stops with the application."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = Batcher(pool, max_batch, max_waiting)
        try:
            yield
        finally:
            app.state.batcher.close()

    app = FastAPI(title="tunelab serve", lifespan=lifespan)
    app.state.pool = pool
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("tunelab.serve").joinpath("chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": 0, "owned_by": "tunelab",
             "tunelab": {"source": s.source, "context_length": s.context_length,
                         "shape": s.inputs.shape, "adapter": s.lora_adapter is not None or s.virtual_tokens > 0
                         or s.em.model.prefix}} for s in pool.served.values()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        return await _complete(request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _complete(request, body)

    @app.post("/tunelab/render")
    async def render_prompt(request: Request) -> dict[str, Any]:
        """The exact prompt text and ids a chat (messages) or completions (prompt) body makes."""
        raw = await _json(request)
        try:
            body = ChatRequest.model_validate(raw) if "messages" in raw else CompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(list(exc.errors())) from None
        prompt = await asyncio.to_thread(_render_locked, app, _served(pool, body.model), body)
        return {"model": body.model, "prompt": prompt.text, "prompt_ids": prompt.ids, "max_tokens": prompt.max_tokens}

    return app


async def _json(request: Request) -> dict[str, Any]:
    try:
        raw = json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the body must be a JSON object")
    return raw
