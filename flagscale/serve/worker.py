"""One inference thread that owns the policy: `load()` (the engine's: build, check, warm up), then
micro-batched `infer_batch` calls.

Requests are queued (bounded by max_queue). The thread takes the oldest request, then gathers more
requests with the same num_steps until max_batch_size observations are collected or max_wait_ms has
passed, and calls `policy.infer_batch` once. Requests with real-time chunking (`rtc`) batch only
with each other: their model call runs the guided sampler (eager), plain batches keep theirs. Only
this thread ever touches the policy, so two model calls never run concurrently. If a batch of
several requests fails, each request is re-run alone so only the faulty one gets the error.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time

from typing import TYPE_CHECKING, Callable

from flagscale.logger import get_logger

if TYPE_CHECKING:
    from flagscale.serve.engine import Loaded

logger = get_logger("flagscale.serve.worker")

LOADING, READY, FAILED, STOPPED = "loading", "ready", "failed", "stopped"


class QueueFull(RuntimeError):
    """The request queue holds max_queue requests already."""


class NotReady(RuntimeError):
    """The policy is still loading (or failed to load, or the worker stopped)."""


class InferTimeout(RuntimeError):
    """A request waited longer than its timeout for its result."""


@dataclasses.dataclass(eq=False)  # identity equality: deque.remove must not compare arrays
class Job:
    observations: list
    noises: list
    seeds: list
    num_steps: int
    future: concurrent.futures.Future
    enqueued: float
    rtc: list | None = None  # per observation: a real-time chunking dict or None

    @property
    def size(self) -> int:
        return len(self.observations)

    @property
    def guided(self) -> bool:
        return self.rtc is not None and any(r is not None for r in self.rtc)


@dataclasses.dataclass
class JobResult:
    outputs: list  # policy outputs, one per observation of the job
    queue_ms: float  # enqueue -> start of the model call
    model_ms: float  # wall time of the infer_batch call that served the job
    batch_size: int  # observations in that call


class InferenceWorker:
    def __init__(
        self,
        load: Callable[[], "Loaded"],
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 2.0,
        max_queue: int = 64,
        on_failure: Callable[[BaseException], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        """load() runs first in the inference thread. Observers: on_failure(exc) if it fails
        (the worker then refuses requests as "failed"), on_batch(observations, model seconds)
        after each model call (the metrics)."""
        self._load_fn = load
        self._loaded: "Loaded | None" = None
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_failure = on_failure
        self.on_batch = on_batch
        self.busy_since: float | None = None  # monotonic start of the running model call
        self.state = LOADING
        self.error: str | None = None
        self._queue = collections.deque()
        self._running: list = []  # jobs of the model call in progress
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pi0-inference", daemon=True)

    # ------------------------------------------------------------ public API

    @property
    def policy(self):
        return self._loaded.policy if self.state == READY else None

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            _fail(job, NotReady("server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.state != FAILED:
            self.state = STOPPED

    def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == LOADING:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return self.state == READY

    def submit(
        self, observations, noises, seeds, num_steps: int, rtc=None
    ) -> concurrent.futures.Future:
        """Queue one request (one or more observations); the future gets a JobResult."""
        job = Job(observations, noises, seeds, num_steps, concurrent.futures.Future(), 0.0, rtc)
        with self._cond:
            if self.state != READY or self._stopping:
                raise NotReady(self.not_ready_message())
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"server busy: {len(self._queue)} requests already queued "
                    f"(engine.max_queue={self.max_queue}); retry later"
                )
            job.enqueued = time.perf_counter()
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    async def infer(
        self, observations, noises, seeds, num_steps: int, timeout: float | None = None, rtc=None
    ) -> JobResult:
        """Queue and await one request; InferTimeout after `timeout` seconds (a queued job is
        dropped; a running model call cannot be interrupted and its result is discarded)."""
        future = self.submit(observations, noises, seeds, num_steps, rtc)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.CancelledError:  # the client left: its queue place is freed at once
            if future.cancel():
                self._discard(future)
            raise
        except asyncio.TimeoutError:
            if future.cancel():
                self._discard(future)  # frees its queue place and batch room at once
            raise InferTimeout(
                f"no result after {timeout:g} s (engine.infer_timeout_s); "
                f"{self.problem(timeout) or 'the server is overloaded'}"
            ) from None

    def abort(self, message: str) -> int:
        """Fail every queued request and those of the running model call with NotReady(message)
        (at the end of a drain); the model call itself runs on, its results are dropped.
        Returns how many requests were failed."""
        with self._cond:
            jobs = list(self._queue) + list(self._running)
            self._queue.clear()
        for job in jobs:
            _fail(job, NotReady(message))
        return len(jobs)

    def _discard(self, future) -> None:
        with self._cond:
            for job in self._queue:
                if job.future is future:
                    self._queue.remove(job)
                    return

    def problem(self, stall_s: float) -> str | None:
        """Why a READY worker cannot serve: its thread died, or a model call is stuck."""
        if self.state == READY and self._thread.ident is not None and not self._thread.is_alive():
            return "the inference thread is not running"
        started = self.busy_since
        if self.state == READY and started is not None:
            running = time.monotonic() - started
            if running > stall_s:
                return (
                    f"inference stalled: a model call has been running for {running:.0f} s "
                    f"(engine.infer_timeout_s={stall_s:g})"
                )
        return None

    # ------------------------------------------------------------ thread body

    def _run(self) -> None:
        try:
            if self._load():
                self._serve()
        except BaseException as e:  # SystemExit, KeyboardInterrupt...: report, never hang callers
            logger.exception("the inference thread died")
            self.error = f"the inference thread died: {type(e).__name__}: {e}"
            self.state = FAILED
            self._fail_pending(RuntimeError(self.error))

    def _serve(self) -> None:
        while True:
            batch = []
            try:
                if not self._next_batch(batch):
                    return
                self._execute(batch)
            except Exception as e:  # never let the thread die: callers would wait forever
                logger.exception("inference worker error")
                for job in batch:
                    _fail(job, e)
            except BaseException as e:
                for job in batch:
                    _fail(job, RuntimeError(f"the inference thread died: {type(e).__name__}"))
                raise

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
        for job in pending:
            _fail(job, error)

    def _load(self) -> bool:
        try:
            loaded = self._load_fn()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            logger.exception("loading the policy failed")
            if self.on_failure is not None:
                self.on_failure(e)
            self.state = FAILED
            return False
        with self._cond:
            if self._stopping:
                return False
            self._loaded = loaded
            self.state = READY
        logger.info("policy ready")
        return True

    def _next_batch(self, batch: list) -> bool:
        """Fill `batch` with the oldest job plus compatible ones; False once stopping."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return False
            first = self._queue.popleft()
            batch.append(first)
            size = first.size
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch_size and not self._stopping:
                job = self._take_compatible(first, self.max_batch_size - size)
                if job is not None:
                    batch.append(job)
                    size += job.size
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return True

    def _take_compatible(self, first: Job, room: int) -> Job | None:
        for job in self._queue:
            same = job.num_steps == first.num_steps and job.guided == first.guided
            if same and job.size <= room:
                self._queue.remove(job)
                return job
        return None

    def _execute(self, batch: list) -> None:
        jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            self._run_jobs(jobs)
        except Exception as e:
            if len(jobs) == 1:
                logger.exception("inference failed")
                _fail(jobs[0], e)
                return
            logger.warning(
                "batched inference failed (%s); re-running %d requests alone", e, len(jobs)
            )
            for job in jobs:
                try:
                    self._run_jobs([job])
                except Exception as solo_error:
                    logger.exception("inference failed")
                    _fail(job, solo_error)

    def _run_jobs(self, jobs: list) -> None:
        observations = [obs for job in jobs for obs in job.observations]
        noises = [noise for job in jobs for noise in job.noises]
        seeds = [seed for job in jobs for seed in job.seeds]
        start = time.perf_counter()
        self.busy_since = time.monotonic()
        self._running = jobs
        try:
            loaded = self._loaded
            if loaded.prepare_batch is not None:
                observations = loaded.prepare_batch(observations)
            extra = {"rtc": [r for job in jobs for r in job.rtc]} if jobs[0].guided else {}
            outputs = loaded.policy.infer_batch(
                observations, num_steps=jobs[0].num_steps, noise=noises, seeds=seeds, **extra
            )
        finally:
            self.busy_since = None
            self._running = []
        model_ms = (time.perf_counter() - start) * 1000.0
        if self.on_batch is not None:
            self.on_batch(len(observations), model_ms / 1000.0)
        if len(outputs) != len(observations):
            raise RuntimeError(
                f"infer_batch returned {len(outputs)} outputs for {len(observations)} observations"
            )
        offset = 0
        for job in jobs:
            result = JobResult(
                outputs=list(outputs[offset : offset + job.size]),
                queue_ms=(start - job.enqueued) * 1000.0,
                model_ms=model_ms,
                batch_size=len(observations),
            )
            offset += job.size
            _resolve(job, result)

    def not_ready_message(self) -> str:
        """Why requests are refused now (the one wording every transport sends)."""
        if self.state == FAILED:
            return f"model failed to load: {self.error}"
        if self.state == LOADING:
            return "model not loaded yet (status: loading); poll GET /health until it is healthy"
        return "server is shutting down"


def _fail(job: Job, error: BaseException) -> None:
    try:
        if not job.future.done():
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)
    except concurrent.futures.InvalidStateError:  # resolved meanwhile by another thread
        pass


def _resolve(job: Job, result: JobResult) -> None:
    try:
        job.future.set_result(result)
    except concurrent.futures.InvalidStateError:  # failed meanwhile (abort)
        pass
