"""ActionChunker: a robot control loop's action queue for real-time chunking (numpy only).

The control loop pops one action per tick. When few actions are left it starts a request for the
next chunk (in the background); `start_request()` returns the request's `rtc` field: the queue's
unexecuted actions and the expected inference delay in control steps. While the request runs the
loop keeps popping; when the chunk arrives, `finish_request(actions)` counts the steps that passed
(the real delay), drops that many actions from the front of the new chunk (their time is over) and
replaces the queue with the rest, as lerobot's RTC `ActionQueue` does. The delay estimate is the
largest real delay of the last `history` requests (lerobot's examples use the max latency too).

    chunker = ActionChunker(request_when_left=20)
    while True:                                   # e.g. at 50 Hz
        if chunker.needs_chunk():
            rtc = chunker.start_request()         # None for the first chunk
            start_thread(fetch, rtc)              # fetch: POST /infer ..., then
                                                  #   chunker.finish_request(reply["actions"][0])
        action = chunker.pop()                    # None until the first chunk arrived
"""

import collections
import threading

import numpy as np


class ActionChunker:
    def __init__(
        self,
        request_when_left: int = 20,
        execution_horizon: int | None = None,
        initial_delay: int = 0,
        history: int = 20,
    ):
        """request_when_left: start the next request when this many actions are left;
        execution_horizon: sent with each request (None: the server's engine.rtc default);
        initial_delay: the delay estimate before any request finished, in control steps."""
        if request_when_left < 0 or initial_delay < 0 or history < 1:
            raise ValueError("request_when_left, initial_delay >= 0 and history >= 1 expected")
        self.request_when_left = request_when_left
        self.execution_horizon = execution_horizon
        self.initial_delay = initial_delay
        self.delays = collections.deque(maxlen=history)  # real delays of recent requests
        self._queue = None  # float32 [n, action_dim]
        self._next = 0  # index of the next action in _queue
        self._popped = 0  # actions popped since creation
        self._started_at = None  # _popped when the request in flight started
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Actions left in the queue."""
        return 0 if self._queue is None else len(self._queue) - self._next

    @property
    def inference_delay(self) -> int:
        """The expected delay of the next request in control steps."""
        return max(self.delays) if self.delays else self.initial_delay

    @property
    def in_flight(self) -> bool:
        return self._started_at is not None

    def pop(self):
        """The next action (float32 [action_dim]), or None when the queue is empty."""
        with self._lock:
            if len(self) == 0:
                return None
            action = self._queue[self._next]
            self._next += 1
            self._popped += 1
            return action

    def needs_chunk(self) -> bool:
        """No request in flight and at most `request_when_left` actions left."""
        return not self.in_flight and len(self) <= self.request_when_left

    def start_request(self) -> dict | None:
        """Mark a request as started; -> its `rtc` field (None while there is no chunk yet)."""
        with self._lock:
            self._started_at = self._popped
            if len(self) == 0:
                return None
            rtc = {
                "prev_chunk_left_over": self._queue[self._next :].tolist(),
                "inference_delay": min(self.inference_delay, len(self)),
            }
            if self.execution_horizon is not None:
                rtc["execution_horizon"] = self.execution_horizon
            return rtc

    def finish_request(self, actions) -> int:
        """The new chunk [H, action_dim] arrived: replace the queue with the actions not yet
        overtaken by time; -> the real delay (actions popped while the request ran)."""
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2:
            raise ValueError(f"actions must be [horizon, action_dim], got {list(actions.shape)}")
        with self._lock:
            if self._started_at is None:
                raise RuntimeError("finish_request() without start_request()")
            delay = self._popped - self._started_at
            self._started_at = None
            self.delays.append(delay)
            self._queue, self._next = actions[delay:], 0
            return delay

    def cancel_request(self) -> None:
        """The request failed: the next `needs_chunk()` may start another."""
        with self._lock:
            self._started_at = None
