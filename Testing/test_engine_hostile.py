"""The engine process trusts nothing it is sent (issue 24, item 4): a real engine, started the way the module
starts it, against a working directory with foreign modules, malformed messages, a silent squatter on the
client's port, and crashes that would leave logs behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from SAMMed2DSegmentLib.service import client as client_module
from SAMMed2DSegmentLib.service.client import EngineClient
from SAMMed2DSegmentLib.service.protocol import decode


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie (exited, not yet reaped) counts as gone
    except OSError:
        return False


def _gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _pinged() -> EngineClient:
    client = EngineClient()
    replies = []
    job = client.submit("ping", on_event=lambda event, header, arrays: replies.append(header))
    client.wait(job, timeout=60)
    assert job.state == "done" and replies[-1]["cwd"] == os.getcwd()  # relative paths keep their meaning
    return client


def test_modules_in_the_working_directory_never_run_in_the_engine(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    for name in ("queue", "json", "threading", "argparse", "logging", "numpy"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["", os.environ.get("PYTHONPATH", "")]))  # "" is "."
    client = _pinged()
    client.close()
    assert not marker.exists()


def _frame(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<I", len(header)) + header + body


def _header(value: object) -> bytes:
    return _frame(json.dumps(value).encode())


_BAD_MESSAGES = {
    "bad JSON": _frame(b'{"op": "ping", "job": '),
    "short frame": b"\x01\x00",
    "header longer than the frame": struct.pack("<I", 1000) + b'{"op": "ping"}',
    "100k-deep nesting": _frame(b"[" * 100_000 + b"]" * 100_000),
    "array claiming 800 GB": _header(
        {
            "op": "segment",
            "job": 7,
            "_arrays": {
                "seed_0": {
                    "dtype": "|u1",
                    "shape": [800_000, 1_000_000],
                    "offset": 0,
                    "size": 800_000_000_000,
                }
            },
        }
    ),
    "object dtype": _frame(
        json.dumps(
            {"op": "ping", "job": 7, "_arrays": {"a": {"dtype": "|O", "shape": [1], "offset": 0, "size": 8}}}
        ).encode(),
        b"\0" * 8,
    ),
    "header not a dict": _header([1, 2, 3]),
    "cancel with a text job number": _header({"op": "cancel", "job": 7, "target": "3"}),
    "text job number": _header({"op": "ping", "job": "7"}),
    "unknown request": _header({"op": "format_disk", "job": 7}),
    "set_volume with an object dtype": _header(
        {"op": "set_volume", "job": 7, "shm": "x", "shape": [1], "dtype": "|O", "ijk_to_ras": [], "key": "k"}
    ),
}


@pytest.mark.parametrize("raw", _BAD_MESSAGES.values(), ids=_BAD_MESSAGES.keys())
def test_a_malformed_message_gets_one_error_and_the_engine_leaves(raw):
    client = _pinged()
    conn, pid = client._conn, client.pid
    try:
        conn.send_bytes(raw)
        replies = []
        with pytest.raises((EOFError, OSError)):  # the engine closes the connection after its one reply
            while conn.poll(5):
                replies.append(decode(conn.recv_bytes())[0])
            raise AssertionError("the connection stayed open")
        assert [r["event"] for r in replies] == ["error"]
        assert "malformed request" in replies[0]["message"] and "\n" not in replies[0]["message"]
        assert _gone(pid), "the engine is still running after its client's connection ended"
    finally:
        client.close()


def test_a_request_over_the_bound_is_refused_on_the_slicer_side(monkeypatch):
    monkeypatch.setattr(client_module, "MAX_MESSAGE_BYTES", 1000)
    client = EngineClient()
    with pytest.raises(ValueError, match="over the engine's bound"):
        client.submit("segment", {"key": "k"}, {"seed_0": np.zeros(2000, np.uint8)})
    assert client.pid is None and not client.jobs  # nothing started, nothing pending


def test_a_frame_longer_than_the_bound_closes_the_connection_before_any_allocation():
    client = _pinged()
    conn, pid = client._conn, client.pid
    try:
        os.write(conn.fileno(), struct.pack("!i", -1) + struct.pack("!Q", 800 * 10**9))  # "800 GB follow"
        with pytest.raises((EOFError, OSError)):
            conn.poll(5) and conn.recv_bytes()
            raise AssertionError("the connection stayed open")
        assert _gone(pid)
    finally:
        client.close()


_CHALLENGE = b"#CHALLENGE#{sha256}" + b"x" * 40  # a challenge frame as multiprocessing sends it, then silence


@pytest.mark.parametrize(("junk", "bound"), [
    (b"", 0.1), (b"GET / HTTP/1.0\r\n\r\n", 0.1), (struct.pack("!i", len(_CHALLENGE)) + _CHALLENGE, 0.6),
], ids=["silent", "wrong protocol", "a challenge, then silence"])  # fmt: skip
def test_a_squatter_on_the_port_never_blocks_a_poll(junk, bound):
    """A silent or wrong peer costs a poll nothing; one that mimics the engine's first message and then
    stalls costs at most the handshake's read timeout, once."""
    client = EngineClient()
    client.start()
    squatter = socket.create_connection(client._listener.getsockname()[:2])
    squatter.sendall(junk)
    threading.Timer(3.0, squatter.close).start()  # without the fix a poll would block until then
    try:
        job = client.submit("ping")
        worst, deadline = 0.0, time.monotonic() + 60
        while job.number in client.jobs and time.monotonic() < deadline:
            started = time.perf_counter()
            client.poll()
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.002)
        print(f"longest poll with a squatter: {worst * 1000:.1f} ms")
        assert job.state == "done" and worst < bound
    finally:
        client.close()
        squatter.close()


def _logs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("engine-*.log"))


def test_logs_go_on_a_clean_exit_and_only_the_newest_crash_logs_stay(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMMED2D_CACHE_DIR", str(tmp_path))
    in_tmp = set(Path(tempfile.gettempdir()).glob("sammed2d-engine-*.log"))
    client = _pinged()
    assert len(_logs(tmp_path)) == 1  # the running engine's
    assert client.close() == 0 and _logs(tmp_path) == []  # a clean exit leaves none
    folder = next(p for p in tmp_path.rglob("*") if p.is_dir())
    foreign = [folder / "notes.txt", folder / "engine-notes.txt", folder / "mine.log"]
    for path in foreign:
        path.write_text("not the engine's")
    for _ in range(5):  # crashes: each keeps its log (the last line is the message), the newest 3 stay
        client = _pinged()
        os.kill(client.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while client.pid is not None and time.monotonic() < deadline:
            client.poll() or time.sleep(0.01)
        time.sleep(0.02)  # distinct modification times
    assert len(_logs(tmp_path)) == 3 and all(path.exists() for path in foreign)
    leftovers = [folder / "engine-leftove1.log", folder / "engine-leftove2.log"]  # a Slicer that crashed
    for path in leftovers:
        path.write_text("old")
        os.utime(path, (1e9, 1e9))
    _pinged().close()
    assert len(_logs(tmp_path)) == 3 and not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in foreign)
    assert set(Path(tempfile.gettempdir()).glob("sammed2d-engine-*.log")) <= in_tmp
