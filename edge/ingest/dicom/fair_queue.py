"""The DICOM workers' queue: round-robin over sources, one FIFO per source.

A source is who sent the work (the peer's IP address; ``recovery`` for
instances recovered at start-up). Workers take one item from each source in
rotation, so one busy source delays another's item by at most one turn,
never by its whole backlog. What a turn is (one instance, or a few frames of
a multi-frame one) is :mod:`edge.ingest.dicom.pipeline`'s business: it puts
a continuation back at the front of its source's queue.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Round-robin over sources: each source has its own FIFO; one item per source per rotation."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._closed = False

    def put(self, job: T, source: str, front: bool = False) -> bool:
        """Queue ``job`` for ``source`` (``front``: ahead of the source's others, e.g. a continuation).

        Returns False once closed (the job is not queued; its instance stays in the spool).
        """
        with self._cv:
            if self._closed:
                return False
            q = self._queues.get(source)
            if q is None:
                q = self._queues[source] = deque()  # a new source joins at the end of the rotation
            if front:
                q.appendleft(job)
            else:
                q.append(job)
            self._cv.notify()
            return True

    def get(self) -> T | None:
        """The next job in rotation (blocks); ``None`` once closed."""
        with self._cv:
            while not self._queues and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            source, q = next(iter(self._queues.items()))
            job = q.popleft()
            del self._queues[source]
            if q:
                self._queues[source] = q  # its turn is over: to the end of the rotation
            return job

    def close(self) -> list[T]:
        """Wake every waiting worker with ``None``; returns the jobs still queued."""
        with self._cv:
            self._closed = True
            left = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._cv.notify_all()
            return left

    def __len__(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())
