"""Messages between the Slicer process and the engine process (standard library and numpy only).

A message is a JSON header and named numpy arrays, framed as one byte string: 4-byte header length, the JSON
header (which lists each array's dtype, shape and byte range) and the arrays' raw bytes. Nothing is pickled,
so neither side ever runs code from the other, and masks travel as bytes, not as lists of numbers. The
channel itself is `multiprocessing.connection` on the loopback interface, opened with a random auth key.
`decode` trusts nothing: a frame's size is bounded before it is read, the header must be a JSON object of
bounded depth, arrays must have an allowed dtype and fit the bytes sent, and `check_request` types each
request's fields. The engine answers a message that fails them with one error and hangs up.

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
import math
import socket
import struct
from collections.abc import Mapping
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import numpy as np

#: Requests that set the engine up for later work; "cancel all" leaves them to run (see above).
SETUP_OPS = frozenset({"load_model", "set_volume"})

#: Environment variable through which the engine process reads its auth key (hex); never on the command line.
AUTHKEY_ENV = "SAMMED2D_ENGINE_AUTHKEY"

_LENGTH = struct.Struct("<I")

#: The largest message either side reads (checked from the frame's length, before its bytes are allocated).
#: Volumes travel through shared memory; the largest message is an export's packed masks (1 bit a voxel).
MAX_MESSAGE_BYTES = 1 << 31

#: The largest JSON header, and how deep it may nest (json's own recursion would end in RecursionError).
MAX_HEADER_BYTES = 16 << 20
MAX_HEADER_DEPTH = 32

#: The only array types that travel: plain numbers in either byte order (no objects, records or strings).
ALLOWED_DTYPES = frozenset(
    f"{order}{code}" for order in "<>" for code in ("i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8")
) | {"|b1", "|u1", "|i1"}

#: Fields each request must carry, with their JSON types (a request is refused before it is queued).
_TEXT, _LIST = (str,), (list,)
REQUEST_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ping": {},
    "load_model": {"path": _TEXT},
    "set_volume": {"shm": _TEXT, "shape": _LIST, "dtype": _TEXT, "ijk_to_ras": _LIST, "key": _TEXT},
    "segment": {"key": _TEXT, "axis": _TEXT, "direction": _TEXT, "points": _LIST, "rois": _LIST},
    "prefetch": {"key": _TEXT, "axis": _TEXT, "center": (int,)},
    "export_dicom_seg": {
        "files": _LIST,
        "out": _TEXT,
        "segments": _LIST,
        "shape": _LIST,
        "ijk_to_ras": _LIST,
        "model_sha256": _TEXT,
    },  # fmt: skip
    "download": {"model": _TEXT},
    "cancel": {"target": (int, type(None))},
    "shutdown": {},
}

#: Request operations the engine understands.
OPS = tuple(REQUEST_FIELDS)


class ProtocolError(ValueError):
    """A message that breaks the protocol (framing, header, arrays or request fields): never acted on."""


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
    """The header and arrays of a message made by `encode` (arrays are read-only views of `message`).
    Anything else raises ProtocolError before a byte is allocated for it: the sender is not trusted."""
    view = memoryview(message)
    if len(view) < _LENGTH.size:
        raise ProtocolError(f"a message of {len(view)} byte(s) is shorter than its length field")
    (length,) = _LENGTH.unpack_from(view, 0)
    body = _LENGTH.size + length
    if length > min(MAX_HEADER_BYTES, len(view) - _LENGTH.size):
        raise ProtocolError(f"the header claims {length} bytes of a {len(view)}-byte message")
    text = bytes(view[_LENGTH.size : body])
    if _nesting(text) > MAX_HEADER_DEPTH:
        raise ProtocolError(f"the header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError(f"the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"the header is a JSON {type(header).__name__}, not an object")
    layout = header.pop("_arrays", {})
    if not isinstance(layout, dict):
        raise ProtocolError("the header's array list is not an object")
    return header, {name: _array(name, spec, view[body:]) for name, spec in layout.items()}


def _nesting(text: bytes) -> int:
    """How deep JSON text nests (brackets inside strings count too: an over-estimate is only stricter)."""
    brackets = np.frombuffer(text.translate(None, delete=_NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max(initial=0))


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _array(name: str, spec: Any, body: memoryview) -> np.ndarray:
    """One array of a message, after checking its spec against the allow-list and the bytes that came."""
    if not isinstance(spec, dict) or spec.get("dtype") not in ALLOWED_DTYPES:
        raise ProtocolError(f"array {name!r} has no allowed dtype (plain numbers only)")
    shape, offset, size = spec.get("shape"), spec.get("offset"), spec.get("size")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_whole(n) for n in shape):
        raise ProtocolError(f"array {name!r} has no valid shape")
    if not (_whole(offset) and _whole(size) and offset + size <= len(body)):
        raise ProtocolError(f"array {name!r} claims bytes beyond the message")
    dtype = np.dtype(spec["dtype"])
    if math.prod(shape) * dtype.itemsize != size:
        raise ProtocolError(f"array {name!r}: shape {shape} of {dtype} does not fill its {size} bytes")
    return np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(shape)


def _whole(value: Any) -> bool:
    return type(value) is int and value >= 0


def check_request(header: dict[str, Any]) -> None:
    """Refuse a request (ProtocolError) whose operation, job number or fields the engine cannot read."""
    op = header.get("op")
    if op not in REQUEST_FIELDS:
        raise ProtocolError(f"unknown request {op!r}")
    job = header.get("job")
    if not _whole(job) or job >= 1 << 53:
        raise ProtocolError(f"the job number {job!r} of {op!r} is not a whole number")
    for key, types in REQUEST_FIELDS[op].items():
        value = header.get(key)
        if type(value) not in types or (key == "target" and value is not None and not _whole(value)):
            raise ProtocolError(f"{op!r} needs {key!r} as {' or '.join(t.__name__ for t in types)}")
    shape_ok = op != "set_volume" or all(map(_whole, header["shape"]))
    if not shape_ok or (op == "set_volume" and header["dtype"] not in ALLOWED_DTYPES):
        raise ProtocolError("'set_volume' needs a plain numeric dtype and a whole-number shape")


def job_number(header: Any) -> int:
    """The job a (possibly malformed) request names, for its error reply; 0 when it names none."""
    job = header.get("job") if isinstance(header, dict) else None
    return job if _whole(job) else 0


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A bool mask as bits (8× smaller on the wire); `unpack_mask` needs its shape back."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=None)


def unpack_mask(bits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Refuses bits that are not exactly one mask of `shape` (unpacking would pad or cut them silently)."""
    count = int(np.prod(shape))
    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != (count + 7) // 8:
        raise ProtocolError(f"a mask of {bits.size} {bits.dtype} value(s) is not one of shape {tuple(shape)}")
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
    sets the same option on its end. The engine sends its challenge first, so that the Slicer side never waits
    on a connection that has said nothing (any local process may connect to its listener)."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock.detach())
    deliver_challenge(conn, authkey)  # the engine speaks first: the Slicer side reads only peers that did
    answer_challenge(conn, authkey)
    return conn
