"""The engine's idle pre-encoding yields to a request after at most one slice (in process: the server's
loop with a stand-in connection, the small synthetic model and a small volume)."""

from __future__ import annotations

import threading

import numpy as np

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor
from SAMMed2DSegmentLib.engine.session import SegmentationSession
from SAMMed2DSegmentLib.service.protocol import decode
from SAMMed2DSegmentLib.service.server import EngineServer


class _Connection:
    """Sends are recorded; nothing ever arrives (requests go straight into the server's inbox)."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(decode(data)[0])

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        threading.Event().wait()  # the reader thread (a daemon) waits here for good
        raise EOFError


def test_a_request_waits_for_at_most_one_idle_slice(small_model):
    volume = np.random.default_rng(0).integers(-1000, 400, (8, 32, 32)).astype(np.int16)
    server = EngineServer(_Connection())
    server.session = SegmentationSession(SamMed2DPredictor(small_model))
    server.volume = {"array": volume, "ijk_to_ras": np.eye(4), "modality": "CT", "key": "v1"}
    server._set_session_volume()
    events: list[str] = []
    prefetch = server.session.prefetch

    def recording_prefetch(axis, indices, should_cancel=None):
        done = prefetch(axis, indices, should_cancel)
        events.append(f"encoded {list(indices)}")
        if len(events) == 1:  # a click arrives while the first idle slice is being encoded
            server.inbox.put(({"op": "ping", "job": 1}, {}))
        if len(events) == 4:
            server.inbox.put(({"op": "shutdown"}, {}))
        return done

    server.session.prefetch = recording_prefetch
    original_ping = server.op_ping
    server.op_ping = lambda job, header, arrays: events.append("ping") or original_ping(job, header, arrays)
    server.op_prefetch(0, {"axis": "axial", "center": 4, "key": "v1"}, {})
    assert list(server.idle_plan) == [4, 5, 3, 6, 2, 7, 1, 0]
    server.serve()
    assert events[:2] == ["encoded [4]", "ping"]  # answered right after the one slice under way
    assert events[2:] == ["encoded [5]", "encoded [3]"]  # then pre-encoding goes on, until the shutdown
    assert server.conn.sent[0]["event"] == "done" and server.conn.sent[0]["job"] == 1
