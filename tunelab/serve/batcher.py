"""Static batching: one worker thread runs the model; requests that wait together and agree on model and sampling
settings are generated as one left-padded batch (evaluate/'s `generate_batch`), each row streaming its own tokens.

A batch takes the oldest waiting request and every waiting request of its kind, up to `max_batch`. Rows finish on
their own (end id, end of turn, stop string, their own max_tokens, or their client gone) through a stopping
criterion, which transformers applies per row; the batch ends when every row has. The waiting line is bounded:
`submit` refuses when it is full, and the server answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.evaluate.generate import decoding, generate_batch
from tunelab.serve.pool import ModelPool, Served
from tunelab.serve.rows import Row

log = logging.getLogger("tunelab.serve")


@dataclass(frozen=True)
class Outcome:
    """How one request's generation ended (the batcher keeps the recent ones)."""
    model: str
    batch_size: int
    completion_tokens: int
    max_tokens: int
    cancelled: bool


class QueueFull(Exception):
    """The waiting line is full."""


@dataclass
class Job:
    """One request on its way through the worker; events go back to the request's event loop."""
    served: Served
    prompt_ids: list[int]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def kind(self) -> tuple[Any, ...]:
        """Requests of one kind share a batch: one model, one decoding rule. A seeded sampled request runs alone, so
        that its seed alone decides its sample."""
        if self.temperature == 0:
            return (self.served.name, "greedy")
        return (self.served.name, self.temperature, self.top_p, id(self) if self.seed is not None else None)

    def send(self, event: tuple[str, Any]) -> None:
        """Hand an event to the request: ('text', delta), ('done', (Generation, finish_reason, completion tokens))
        or ('error', message)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop has closed
            pass


def log_request(job: Job, completion_tokens: int, outcome: str) -> None:
    """The request's one log line: model, prompt and completion tokens, time to first token, tokens/s (completion
    tokens over the request's whole time, waiting included)."""
    elapsed = time.perf_counter() - job.created
    ttft = f"{job.first_token_at - job.created:.3f}s" if job.first_token_at else "-"
    log.info(f"serve: model={job.served.name} prompt_tokens={len(job.prompt_ids)} "
             f"completion_tokens={completion_tokens} ttft={ttft} "
             f"tokens/s={completion_tokens / elapsed if elapsed > 0 else 0:.1f} {outcome}")


class _Rows(StoppingCriteria):
    """Feeds each step's new tokens to the rows and tells transformers which rows are done."""

    def __init__(self, jobs: list[Job], rows: list[Row], lock: threading.Lock) -> None:
        self.jobs, self.rows, self.lock = jobs, rows, lock

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with self.lock:
            return self._step(input_ids)

    def _step(self, input_ids: torch.Tensor) -> torch.Tensor:
        done = []
        for job, row, token in zip(self.jobs, self.rows, input_ids[:, -1].tolist()):
            if not row.finished and not job.cancelled.is_set():
                delta = row.add(token)
                if job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                if delta:
                    job.send(("text", delta))
            done.append(row.finished or job.cancelled.is_set())
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Batcher:
    """The waiting line and the worker thread that empties it, batch by batch."""

    def __init__(self, pool: ModelPool, max_batch: int = 32, max_waiting: int = 64) -> None:
        self.pool, self.max_batch, self.max_waiting = pool, max_batch, max_waiting
        self.waiting: deque[Job] = deque()
        self.ready = threading.Condition()
        self.closed = False
        self.outcomes: deque[Outcome] = deque(maxlen=1024)  # the recent requests' generations, newest last
        self.thread = threading.Thread(target=self._work, name="tunelab-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.ready:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull
            self.waiting.append(job)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=60)

    def _next_batch(self) -> list[Job] | None:
        with self.ready:
            while not self.closed:
                live = [j for j in self.waiting if not j.cancelled.is_set()]  # a client gone before its turn
                for job in self.waiting:
                    if job.cancelled.is_set():
                        log_request(job, 0, "disconnected before its turn")
                self.waiting = deque(live)
                if live:
                    kind = live[0].kind
                    batch = [j for j in live if j.kind == kind][: self.max_batch]
                    self.waiting = deque(j for j in live if j not in batch)
                    return batch
                self.ready.wait()
        return None

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                for job in batch:
                    log_request(job, 0, "error")
                    job.send(("error", f"generation failed: {type(exc).__name__}: {exc}"))

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        first = jobs[0]
        with self.pool.active(first.served) as em:
            dec = decoding(em, max(j.max_tokens for j in jobs), first.temperature > 0, first.temperature or 1.0,
                           first.top_p)
            rows = [Row(em.tokenizer, dec, j.max_tokens, j.stop) for j in jobs]
            if first.seed is not None:
                torch.manual_seed(first.seed)
            generate_batch(em, [j.prompt_ids for j in jobs], dec, stopping_criteria=StoppingCriteriaList(
                [_Rows(jobs, rows, self.pool.tokenizer_lock)]))
        for job, row in zip(jobs, rows):
            with self.pool.tokenizer_lock:
                result = row.result()
                finish = row.finish_reason(result)
            rest = row.rest(result)
            if not result.text.startswith(row.sent):  # Row holds back what may change: this would be a bug
                log.warning(f"serve: the streamed text of a {job.served.name} answer is not a prefix of its final text")
            if rest:
                job.send(("text", rest))
            self.outcomes.append(Outcome(job.served.name, len(jobs), len(row.tokens), job.max_tokens,
                                         job.cancelled.is_set()))
            log_request(job, len(row.tokens), "disconnected" if job.cancelled.is_set() else f"finish={finish}")
            job.send(("done", (result, finish, len(row.tokens))))
