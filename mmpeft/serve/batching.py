"""Dynamic batching: requests to one bundle that arrive close together share one forward pass.

Each bundle has a queue. A worker takes the first waiting request, then keeps collecting
requests of the same bundle until ``max_batch`` are there or ``max_wait_ms`` have passed
since the first, runs them as one batch in a worker thread (the event loop keeps
accepting requests meanwhile) and hands each request its own answer. ``max_batch=1`` turns
batching off (every request is its own forward pass), which ``mmpeft bench serve`` measures
against. Chat requests (:class:`ChatBatcher`) are batched the same way for generation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Job:
    image: object
    question: str
    top_k: int
    future: asyncio.Future
    audio: str | None = None  # path of the uploaded clip (bundles with an audio encoder)
    video: str | None = None  # path of the uploaded video (bundles with a video encoder)
    own: dict = field(default_factory=dict)  # encoders reading an input of their own: {name: image, text or clip path}
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, pool, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.pool = pool
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.queues: dict[str, asyncio.Queue] = {}
        self.workers: list[asyncio.Task] = []
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        for name in self.pool.bundles:
            self.queues[name] = asyncio.Queue()
            self.workers.append(asyncio.create_task(self._work(name), name=f"batcher {name}"))

    async def stop(self) -> None:
        """Answer what is queued, then stop the workers."""
        for queue in self.queues.values():
            await queue.join()
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)

    async def submit(self, bundle: str, image, question: str, top_k: int, audio: str | None = None,
                     own: dict | None = None, video: str | None = None) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queues[bundle].put(Job(image, question, top_k, future, audio=audio, own=own or {}, video=video))
        return await future

    async def _answer(self, bundle: str, jobs: list[Job]) -> None:
        """Answer ``jobs`` in one forward pass; if it fails, each alone, so that one request's
        failure (an input that passed every check and still breaks the model) stays its own."""
        top_k = max(job.top_k for job in jobs)  # each answer is cut to its own top_k below
        try:
            answers = await asyncio.to_thread(self.pool.answer, bundle, [j.image for j in jobs], [j.question for j in jobs],
                                              top_k, [j.audio for j in jobs], [j.own for j in jobs],
                                              [j.video for j in jobs])
        except Exception as exc:  # noqa: BLE001 - the requests learn of it
            if len(jobs) == 1:
                if not jobs[0].future.done():
                    jobs[0].future.set_exception(exc)
                return
            for job in jobs:
                await self._answer(bundle, [job])
            return
        cut = self.pool.bundles[bundle].top_k_answers
        for job, answer in zip(jobs, answers):
            if not job.future.done():
                own = {"top_k": answer["top_k"][: job.top_k]} if cut else {}
                job.future.set_result({**answer, **own, "batch_size": len(jobs)})

    async def _work(self, bundle: str) -> None:
        queue = self.queues[bundle]
        while True:
            jobs = await take_batch(queue, self.max_batch, self.max_wait)
            try:
                await self._answer(bundle, jobs)
            finally:
                self.batches += 1
                self.requests += len(jobs)
                for _ in jobs:
                    queue.task_done()


async def take_batch(queue: asyncio.Queue, max_batch: int, max_wait: float) -> list:
    """The next batch: the first job, every job already waiting (those that queued while the
    last batch ran, however long ago), then those arriving within ``max_wait`` of the first."""
    jobs = [await queue.get()]
    while len(jobs) < max_batch and not queue.empty():
        jobs.append(queue.get_nowait())
    deadline = jobs[0].queued + max_wait
    while len(jobs) < max_batch:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        try:
            jobs.append(await asyncio.wait_for(queue.get(), remaining))
        except asyncio.TimeoutError:
            break
    return jobs


@dataclass
class ChatJob:
    request: tuple  # (image or None, text, history)
    options: dict  # decoding settings: only requests asking for the same ones share a batch
    future: asyncio.Future
    on_text: object = None  # called with each piece of the reply (a streamed request), from the worker thread
    started: bool = False  # a piece was already sent: the request cannot be answered again alone
    queued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> str:
        return repr(sorted(self.options.items()))


class ChatBatcher:
    """Chat requests to one bundle that arrive within ``max_wait_ms`` of each other and ask for
    the same decoding settings are generated as one batch (left-padded, so greedy replies are
    the ones each request gets alone); ``max_batch=1`` generates each request alone."""

    def __init__(self, pool, max_batch: int = 16, max_wait_ms: float = 5.0):
        self.pool = pool
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.queues: dict[str, asyncio.Queue] = {}
        self.workers: list[asyncio.Task] = []
        self.batches = 0
        self.requests = 0

    def start(self, names) -> None:
        for name in names:
            self.queues[name] = asyncio.Queue()
            self.workers.append(asyncio.create_task(self._work(name), name=f"chat batcher {name}"))

    async def stop(self) -> None:
        for queue in self.queues.values():
            await queue.join()
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)

    async def submit(self, bundle: str, request: tuple, options: dict, on_text=None) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queues[bundle].put(ChatJob(request, options, future, on_text))
        return await future

    async def _generate(self, bundle: str, jobs: list[ChatJob]) -> None:
        def sender(job):
            def send(piece):
                job.started = True
                if job.on_text is not None:
                    job.on_text(piece)
            return send

        try:
            replies = await asyncio.to_thread(self.pool.chat, bundle, [j.request for j in jobs], jobs[0].options,
                                              [sender(j) for j in jobs])
        except Exception as exc:  # noqa: BLE001 - the requests learn of it
            if len(jobs) == 1 or any(j.started for j in jobs):
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                return
            for job in jobs:  # one request's failure stays its own
                await self._generate(bundle, [job])
            return
        for job, reply in zip(jobs, replies):
            if not job.future.done():
                job.future.set_result({**reply, "batch_size": len(jobs)})

    async def _work(self, bundle: str) -> None:
        queue = self.queues[bundle]
        while True:
            jobs = await take_batch(queue, self.max_batch, self.max_wait)
            groups: dict[str, list[ChatJob]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            try:
                for group in groups.values():
                    await self._generate(bundle, group)
                    self.batches += 1
                    self.requests += len(group)
            finally:
                for _ in jobs:
                    queue.task_done()
