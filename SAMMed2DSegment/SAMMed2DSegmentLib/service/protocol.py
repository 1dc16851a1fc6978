"""Messages between the Slicer process and the engine process (standard library and numpy only).

A message is a JSON header and named numpy arrays, framed as one byte string: 4-byte header length, the JSON
header (which lists each array's dtype, shape and byte range) and the arrays' raw bytes. Nothing is pickled,
so neither side ever runs code from the other, and masks travel as bytes, not as lists of numbers. The
channel itself is `multiprocessing.connection` on the loopback interface, opened with a random auth key.

Requests (Slicer → engine): {"op": ..., "job": N, ...}. Replies (engine → Slicer): {"job": N, "event": ...}
with event "progress" (e.g. bytes downloaded), "slice" (one finished slice of a propagation, mask attached),
"done" (the job's result), "error" (one-line message), "cancelled".

"Cancel all" ({"op": "cancel", "target": null}) stops work (segment, prefetch, export, download), never
set-up: a queued `load_model` or `set_volume` still runs, because the Slicer side has recorded it as sent and
the next action relies on it (a Stop pressed while the first volume is on its way must not break every later
action on that volume). A cancel naming one job cancels that job, set-up or not.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Mapping
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import numpy as np

#: Request operations the engine understands.
OPS = (
    "ping",
    "load_model",
    "set_volume",
    "segment",
    "prefetch",
    "export_dicom_seg",
    "download",
    "cancel",
    "shutdown",
)

#: Requests that set the engine up for later work; "cancel all" leaves them to run (see above).
SETUP_OPS = frozenset({"load_model", "set_volume"})

#: Environment variable through which the engine process reads its auth key (hex); never on the command line.
AUTHKEY_ENV = "SAMMED2D_ENGINE_AUTHKEY"

_LENGTH = struct.Struct("<I")


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One message as bytes; `header` must be JSON-serialisable (NaN and infinities are refused)."""
    header = dict(header)
    parts, layout, offset = [], {}, 0
    for name, array in (arrays or {}).items():
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} holds Python objects; only plain numeric arrays travel")
        data = array.tobytes()
        layout[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset,
                        "size": len(data)}  # fmt: skip
        parts.append(data)
        offset += len(data)
    header["_arrays"] = layout
    text = json.dumps(header, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return b"".join([_LENGTH.pack(len(text)), text, *parts])


def decode(message: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and arrays of a message made by `encode` (arrays are read-only views of `message`)."""
    view = memoryview(message)
    (length,) = _LENGTH.unpack_from(view, 0)
    header = json.loads(bytes(view[_LENGTH.size : _LENGTH.size + length]).decode("utf-8"))
    body = _LENGTH.size + length
    arrays = {}
    for name, spec in header.pop("_arrays", {}).items():
        dtype = np.dtype(spec["dtype"])
        if dtype.hasobject:
            raise ValueError(f"array {name!r} declares an object dtype")
        start = body + int(spec["offset"])
        data = view[start : start + int(spec["size"])]
        arrays[name] = np.frombuffer(data, dtype=dtype).reshape(spec["shape"])
    return header, arrays


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A bool mask as bits (8× smaller on the wire); `unpack_mask` needs its shape back."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=None)


def unpack_mask(bits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    count = int(np.prod(shape))
    return np.unpackbits(bits, count=count).astype(bool).reshape(shape)


def one_line(error: BaseException) -> str:
    """An exception as the one line a user reads (its type only where the text alone would not say what
    went wrong); the traceback belongs in the details."""
    text = " ".join(str(error).split()) or type(error).__name__
    plain = isinstance(error, (ValueError, RuntimeError, OSError))
    return text if plain else f"{type(error).__name__}: {text}"


def connect_engine(host: str, port: int, authkey: bytes) -> Connection:
    """The engine's end of the channel, as `multiprocessing.connection.Client` makes it but with Nagle's
    algorithm off on the socket: a message over 16 KiB (a slice's mask) goes out as two writes, and with Nagle
    on, the second waits for the peer's delayed acknowledgement (about 40 ms on every slice). The Slicer side
    sets the same option on its end."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock.detach())
    answer_challenge(conn, authkey)
    deliver_challenge(conn, authkey)
    return conn
