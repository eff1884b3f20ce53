"""A scripted protocol-v1 peer for client tests (a "parrot", as in pynetdicom's tests).

It answers every request ``ok`` with an all-zero mask at input size after
``delay_s``, or stops answering after ``answer_limit`` requests (a daemon
that hangs), and can be closed mid-run (a daemon that dies).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import zmq


class FakeRouter:
    """ROUTER on an ephemeral loopback port, served from a thread."""

    def __init__(self, delay_s: float = 0.002, answer_limit: int | None = None,
                 drop_every: int = 0) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.delay_s = delay_s
        self.answer_limit = answer_limit
        self.drop_every = drop_every
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            frames = self.sock.recv_multipart()
            ident, rest = frames[0], frames[1:]
            env = []
            if rest and rest[0] == b"":
                env, rest = [b""], rest[1:]
            self.received += 1
            if self.answer_limit is not None and self.received > self.answer_limit:
                continue
            hdr = json.loads(rest[0])
            if self.delay_s:
                time.sleep(self.delay_s)
            shape = hdr["shape"][:2]
            if self.drop_every and self.received % self.drop_every == 0:
                rep = {"v": 1, "id": hdr["id"], "status": "dropped", "error": {"code": "overloaded", "message": "x"}}
                self.sock.send_multipart([ident, *env, json.dumps(rep).encode()])
                continue
            rep = {"v": 1, "id": hdr["id"], "status": "ok", "model": hdr.get("model", "m"),
                   "task": "segmentation", "boxes": [],
                   "mask": {"dtype": "uint8", "shape": shape},
                   "timing_us": {"queue": 10, "preprocess": 100, "infer": int(self.delay_s * 1e6),
                                 "postprocess": 50, "total": 200 + int(self.delay_s * 1e6)}}
            mask = np.zeros(shape, np.uint8)
            self.sock.send_multipart([ident, *env, json.dumps(rep).encode(), mask.tobytes()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self) -> "FakeRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
