"""The Slicer side of the engine process: starts it, sends requests, and hands replies to callbacks when the
caller polls. Standard library and numpy only (the Slicer process never imports torch), and Qt-free: the
module calls `poll()` from a `qt.QTimer`, and nothing here ever blocks the caller for longer than reading one
reply that is already waiting.

The engine is started lazily by the first request, with the Python interpreter given (inside Slicer,
`sys.executable` is Slicer's `PythonSlicer`) and this process's environment. It connects back to a loopback
listener with a random auth key, which it reads from its environment; the listener is polled, not waited on,
so this side needs no thread of its own (a Python thread inside Slicer would starve: see server.py). The
engine exits when the connection ends, so it never outlives the Slicer process; `close()` (or garbage
collection) stops it too. If it dies (a torch crash, out of memory, `kill -9`), every pending job gets one
"error" event with a one-line message, and the next request starts a new engine (`generation` counts them, so
callers know to send the model and volume again). That holds also when it died while nothing was pending and
nobody polled (e.g. during the idle pre-encoding): `start()` first clears what is left of the dead one.

Nothing the engine is sent or meets is trusted (see protocol.py): it starts in the library's own folder, not
Slicer's working folder; it speaks first on the listener, so a silent local process that connects there is
never waited on; and its stderr goes to a log in our own folder under the cache folder, removed on a clean
exit and kept, the newest few, after a crash.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import IO, Any

import numpy as np

from .protocol import AUTHKEY_ENV, MAX_MESSAGE_BYTES, SETUP_OPS, ProtocolError, decode, encode

#: An event callback: (event name, reply header, reply arrays).
EventCallback = Callable[[str, dict, dict], None]

_LIB_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding SAMMed2DSegmentLib


#: Seconds a handshake read may wait on a peer that has spoken (the engine answers in about a millisecond).
HANDSHAKE_TIMEOUT = 0.25

#: Crash logs kept, the newest (an engine that exits cleanly, or is stopped by `close`, leaves none).
KEPT_CRASH_LOGS = 3
_LOG_PREFIX, _LOG_SUFFIX = "engine-", ".log"
_LOG_NAME = re.compile(r"engine-[a-z0-9_]{8}\.log")  # as tempfile.mkstemp makes them

#: Connections accepted in one poll, and those that have not spoken yet kept between polls (the oldest go).
_MAX_ACCEPTS, _MAX_WAITING_PEERS = 64, 8


class EngineError(RuntimeError):
    """The engine could not be started or stopped unexpectedly."""


@dataclass(eq=False)
class Job:
    number: int
    op: str
    on_event: EventCallback | None
    generation: int
    background: bool = False  # pre-encoding: not "busy" for the panel
    resources: list = field(default_factory=list)  # shared memory blocks to release when the job ends
    state: str = "pending"  # → "done" | "error" | "cancelled", set before its last event is delivered
    message: str = ""  # the one-line message of an "error"


class EngineClient:
    def __init__(
        self,
        python: str | None = None,
        package_dirs: Iterable[str] = (),
        start_timeout: float = 120.0,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.python = python or sys.executable
        self.package_dirs = [str(d) for d in package_dirs]
        self.start_timeout = start_timeout
        self.extra_env = dict(extra_env or {})
        self.generation = 0
        self.jobs: dict[int, Job] = {}
        self._numbers = itertools.count(1)
        self._outbox: list[bytes] = []
        self._process: subprocess.Popen | None = None
        self._listener: socket.socket | None = None
        self._key = b""
        self._conn: Connection | None = None
        self._accepted: list[Connection] = []
        self._started_at = 0.0
        self._log: list[str] = []  # the running engine's log (stderr), removed by the finaliser unless kept
        self._finalizer: weakref.finalize | None = None

    # -- state -------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def busy(self) -> bool:
        """Whether a job the user waits for is pending (pre-encoding does not count)."""
        return any(not job.background for job in self.jobs.values())

    # -- start and stop ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start a new engine process (returns at once; it connects back while the caller polls). What is
        left of a previous engine that died unnoticed (its connection, unsent requests, pending jobs) is
        cleared first: read as the new engine's, its end of file would kill the new one."""
        if self.running:
            return
        if self._process is not None:
            self._engine_died()  # its pending jobs (if any) get their error now
            if self.running:  # an error callback started one already
                return
        key = self._key = secrets.token_bytes(32)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        host, port = self._listener.getsockname()[:2]
        env = dict(os.environ)
        env.update(self.extra_env)
        env[AUTHKEY_ENV] = key.hex()
        env["PYTHONPATH"] = os.pathsep.join([_LIB_PARENT, *filter(None, [env.get("PYTHONPATH")])])
        command = [self.python, "-m", "SAMMed2DSegmentLib.service", "--address", f"{host}:{port}"]
        for folder in self.package_dirs:
            command += ["--package-dir", folder]
        try:  # the engine starts in our own folder and moves here once its imports are safe (see server.main)
            command += ["--cwd", os.getcwd()]
        except OSError:  # the working folder was deleted: relative paths mean nothing anyway
            pass
        self._log = []
        with _open_log(self._log) as stderr:
            # No console window on Windows; the engine reads nothing from stdin and prints to stderr only.
            flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
            self._process = subprocess.Popen(  # `python -m` puts its working folder first on sys.path
                command, env=env, cwd=_LIB_PARENT, stdin=subprocess.DEVNULL, stderr=stderr,
                creationflags=flags,
            )  # fmt: skip
        self.generation += 1
        self._started_at = time.monotonic()
        self._accepted = []
        self._finalizer = weakref.finalize(
            self, _stop_process, self._process, self._listener, self._log, self._accepted
        )

    def close(self, timeout: float = 2.0) -> int | None:
        """Stop the engine and drop every pending job without callbacks. Slicer waits for this while it
        quits, so the engine is told to cancel everything (a propagation stops within one slice) and to
        exit; one that has not exited after `timeout` seconds, or has not even connected yet, is killed.
        Returns its exit status (0: it exited as asked; negative: killed), None without an engine."""
        process, connected = self._process, self._conn is not None
        if connected:
            try:
                self._conn.send_bytes(encode({"op": "cancel", "job": next(self._numbers), "target": None}))
                self._conn.send_bytes(encode({"op": "shutdown", "job": 0}))
            except OSError:
                pass
        if process is not None:
            try:
                process.wait(timeout if connected else 0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._release_all()
        self.jobs.clear()
        if self._finalizer is not None:
            self._finalizer()
        self._conn, self._process, self._listener = None, None, None
        return process.returncode if process is not None else None

    # -- requests ------------------------------------------------------------------------------------------
    def submit(
        self,
        op: str,
        header: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        on_event: EventCallback | None = None,
        background: bool = False,
    ) -> Job:
        """Queue a request; its events reach `on_event` from `poll()`. Starts the engine when needed. A
        request over the engine's message bound is refused here in one line (the engine would hang up)."""
        number = next(self._numbers)
        data = encode({**(header or {}), "op": op, "job": number}, arrays)
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"the {op!r} request is {len(data) / 2**30:.1f} GiB, over the engine's bound "
                             f"of {MAX_MESSAGE_BYTES / 2**30:.0f} GiB")  # fmt: skip
        if not self.running:
            self.start()
        job = Job(number, op, on_event, self.generation, background)
        self.jobs[job.number] = job
        self._send(data)
        return job

    def submit_volume(
        self, array_kji: np.ndarray, header: Mapping[str, Any], on_event: EventCallback | None = None
    ) -> Job:
        """Send a volume through shared memory (not through the channel): the engine copies it out, and the
        block is released when the engine answers."""
        from multiprocessing import shared_memory

        array = np.ascontiguousarray(array_kji)
        shm = shared_memory.SharedMemory(create=True, size=max(array.nbytes, 1))
        try:
            np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
            job = self.submit(
                "set_volume",
                {**header, "shm": shm.name, "shape": list(array.shape), "dtype": array.dtype.str},
                on_event=on_event,
            )
        except BaseException:
            _release(shm)
            raise
        job.resources.append(shm)
        return job

    def cancel(self, job: Job | None = None) -> None:
        """Cancel one job, or every job submitted so far (None). The engine stops a propagation within one
        slice and answers "cancelled"; slices it sent before stay delivered."""
        if self._process is None:
            return
        if job is None:
            self._send(encode({"op": "cancel", "job": next(self._numbers), "target": None}))
        else:
            self._send(encode({"op": "cancel", "job": next(self._numbers), "target": job.number}))

    def forget(self, jobs: Iterable[Job] | None = None) -> None:
        """Drop jobs without delivering their events any more (stale after a scene close) and cancel them:
        the given ones, or every pending one but the set-up requests (model, volume), which go on with their
        callbacks since what they set up outlives the scene (and "cancel all" spares them anyway)."""
        chosen = list(jobs) if jobs is not None else [j for j in self.jobs.values() if j.op not in SETUP_OPS]
        for job in chosen:
            job.on_event = None  # kept in `jobs` until the engine answers, so its resources are released then
        if jobs is None:
            self.cancel(None)
        else:
            for job in chosen:
                self.cancel(job)

    # -- replies -------------------------------------------------------------------------------------------
    def poll(self, max_messages: int = 100) -> int:
        """Deliver waiting replies (never blocks); detect an engine that died. Returns events delivered."""
        if self._process is None:
            return 0
        if self._conn is None and not self._connect():
            return 0
        delivered = 0
        try:
            while delivered < max_messages and self._conn.poll(0):
                try:
                    header, arrays = decode(self._conn.recv_bytes(MAX_MESSAGE_BYTES))
                except ProtocolError as error:  # nothing after it can be trusted to be framed right
                    self._engine_died(f"it sent a malformed reply: {error}")
                    return delivered + 1
                delivered += self._deliver(header, arrays)
        except (EOFError, OSError):
            self._engine_died()
            return delivered + 1
        if not self.running:
            self._engine_died()
            delivered += 1
        return delivered

    def wait(self, job: Job, timeout: float = 600.0, interval: float = 0.005) -> None:
        """Poll until `job` has ended (console and tests; the panel polls from a timer instead)."""
        deadline = time.monotonic() + timeout
        while job.number in self.jobs:
            if self.poll() == 0:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the engine did not finish {job.op!r} in {timeout:.0f} s")
                time.sleep(interval)

    def _deliver(self, header: dict, arrays: dict) -> int:
        job = self.jobs.get(int(header.pop("job", 0)))
        if job is None:
            return 0
        event = header.pop("event", "")
        if event in ("done", "error", "cancelled"):
            del self.jobs[job.number]
            for resource in job.resources:
                _release(resource)
            job.state, job.message = event, header.get("message", "") if event == "error" else ""
        if job.on_event is not None:
            job.on_event(event, header, arrays)
        return 1

    # -- internals -----------------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self._conn is None:
            self._outbox.append(data)
            return
        try:
            self._conn.send_bytes(data)
        except OSError:
            self._engine_died()

    def _connect(self) -> bool:
        """Take the engine's connection once it has shown that it holds the key, never waiting on a peer that
        has not spoken: any local process may connect to the listener first, and a silent one must not hold
        the poll (Slicer's GUI thread). The engine speaks first (its challenge, see protocol.connect_engine),
        so a connection with nothing to read is left for a later poll; when the engine is in, the others are
        dropped and the listener closed."""
        self._accept_waiting()
        for conn in [c for c in self._accepted if c.poll(0)]:  # spoken, or closed: neither blocks
            self._accepted.remove(conn)
            if _handshake(conn, self._key):
                for other in self._accepted:
                    other.close()
                self._accepted[:] = [conn]  # the finaliser closes it
                self._listener.close()
                self._conn = conn
                outbox, self._outbox = self._outbox, []
                for data in outbox:
                    self._send(data)
                return True
            conn.close()  # a wrong key or another protocol: not our engine
        while len(self._accepted) > _MAX_WAITING_PEERS:
            self._accepted.pop(0).close()
        if not self.running:
            self._engine_died()
        elif time.monotonic() - self._started_at > self.start_timeout:
            self._engine_died(f"it did not connect within {self.start_timeout:.0f} s")
        return False

    def _accept_waiting(self) -> None:
        """Accept what waits on the listener (never blocks; a bounded number at a time)."""
        for _ in range(_MAX_ACCEPTS):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # closed under us (a finaliser), or out of descriptors: try on the next poll
                return
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see protocol.connect_engine
            self._accepted.append(Connection(sock.detach()))

    def _engine_died(self, reason: str = "") -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        code = process.returncode if process is not None else None
        last = _last_line(self._log)  # "MemoryError" says more than an exit code; a log line less
        detail = reason or (last if "Error" in last else f"exit code {code}")
        message = (
            f"The segmentation engine stopped unexpectedly ({detail}); nothing more was written. "
            "The next action starts it again."
        )
        jobs = list(self.jobs.values())
        self.jobs.clear()
        self._release_all(jobs)
        if self._log:  # a crash: its log stays for whoever looks into it, with the newest few others
            _prune_logs(Path(self._log.pop()).parent, KEPT_CRASH_LOGS)
        self._reset_connection()
        for job in jobs:  # every state first: a callback may look at another job of the same engine
            job.state, job.message = "error", message
        for job in jobs:
            if job.on_event is not None:
                job.on_event("error", {"message": message, "details": message}, {})

    def _reset_connection(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._conn, self._process, self._listener = None, None, None
        self._outbox = []

    def _release_all(self, jobs: Iterable[Job] | None = None) -> None:
        for job in jobs if jobs is not None else self.jobs.values():
            for resource in job.resources:
                _release(resource)
            job.resources.clear()


def _handshake(conn: Connection, key: bytes) -> bool:
    """Both challenges with a peer that has sent its first: the engine answers each at once, so a read
    waits at most HANDSHAKE_TIMEOUT (a peer that mimics a challenge and then stalls costs no more)."""
    _receive_timeout(conn, HANDSHAKE_TIMEOUT)
    try:
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    except Exception:  # a wrong key (AuthenticationError), another protocol, a stall, or a dead engine
        return False
    _receive_timeout(conn, 0.0)  # replies are read only once they are waiting; a long one arrives whole
    return True


def _receive_timeout(conn: Connection, seconds: float) -> None:
    """How long a read on `conn` may wait (0: without end), as the socket's own option, since a
    `Connection` reads its descriptor directly."""
    sock = socket.socket(fileno=conn.fileno())  # borrowed: detached again below, never closed
    try:
        if os.name == "nt":
            value = struct.pack("L", int(seconds * 1000))
        else:
            value = struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    finally:
        sock.detach()


def _release(shm: Any) -> None:
    try:
        shm.close()
        shm.unlink()
    except (FileNotFoundError, OSError):
        pass


def _open_log(log: list[str]) -> IO[bytes]:
    """A new file for the engine's stderr in our own log folder (its path put in `log`), after removing all
    but the newest crash logs there (a Slicer that crashed never removed its engine's); the null device
    where no such folder can be made."""
    from ..weights.cache_dir import default_cache_dir, owned_folder

    try:
        folder = owned_folder(default_cache_dir() / "engine-logs", "folder of engine logs", "sammed2d-logs")
        _prune_logs(folder, KEPT_CRASH_LOGS)
        fd, path = tempfile.mkstemp(prefix=_LOG_PREFIX, suffix=_LOG_SUFFIX, dir=folder)
    except OSError:
        return open(os.devnull, "wb")
    log.append(path)
    return os.fdopen(fd, "wb")


def _prune_logs(folder: Path, keep: int) -> None:
    """Remove all but the newest `keep` engine logs in `folder`: only plain files named as `_open_log` names
    them, in the folder it marked as ours; never anything else."""
    logs = []
    for path in folder.iterdir():
        try:
            if _LOG_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                logs.append((path.stat().st_mtime, path))
        except OSError:  # gone meanwhile
            continue
    for _, path in sorted(logs, reverse=True)[keep:]:
        try:
            path.unlink()
        except OSError:
            pass


def _last_line(log: list[str]) -> str:
    """The last line the engine wrote to stderr (e.g. "MemoryError"), for the one-line message."""
    if not log:
        return ""
    try:
        with open(log[0], "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode("utf-8", "replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _stop_process(
    process: subprocess.Popen,
    listener: socket.socket | None,
    log: list[str],
    conns: list[Connection],
) -> None:
    """Finaliser: no engine outlives its client (also runs at interpreter exit). Closing the connection
    matters inside Slicer: `PythonSlicer` is a launcher, and killing it may leave its Python child running,
    which exits when it sees the connection end."""
    for conn in conns:
        try:
            conn.close()
        except OSError:
            pass
    if process.poll() is None:
        process.kill()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass
    if listener is not None:
        try:
            listener.close()
        except OSError:
            pass
    for path in log:  # an engine that crashed has left this list: its log stays (see _engine_died)
        try:
            os.unlink(path)
        except OSError:
            pass
