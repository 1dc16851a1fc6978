"""The engine process: holds the model, the embedding cache and a copy of the volume, and answers the Slicer
process's requests one at a time on its main thread (`python -m SAMMed2DSegmentLib.service`).

Why a process: PythonQt keeps the GIL while Slicer's main thread waits in the Qt event loop, so a Python
thread inside Slicer only runs while the GUI happens to run Python; a child process runs freely, survives
nothing of a torch crash but itself, and may put a private package folder on its `sys.path`.

A reader thread takes requests off the connection as they come, so a cancel reaches a running propagation
within one slice, and the engine exits as soon as the Slicer side goes away (end of the connection). While
no request waits, the engine pre-encodes the slices around the one on screen, one slice at a time, so a
click waits for at most one slice.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NoReturn

import numpy as np

from .protocol import (
    AUTHKEY_ENV,
    MAX_MESSAGE_BYTES,
    SETUP_OPS,
    check_request,
    connect_engine,
    decode,
    encode,
    job_number,
    one_line,
    pack_mask,
    unpack_mask,
)

log = logging.getLogger("SAMMed2D.engine")

_EOF = object()

#: Seconds a running job gets to stop once Slicer has asked the engine to exit (see EngineServer).
EXIT_GRACE = 1.0


class JobCancelled(Exception):
    """The Slicer side cancelled the job; reported as "cancelled", not as an error."""


class EngineServer:
    def __init__(self, conn: Connection, exit_grace: float | None = None) -> None:
        """`exit_grace`: seconds the running job gets to stop after a shutdown (or the end of the connection)
        before the process leaves anyway, since nothing it computes can be delivered any more (one slice can
        take longer than Slicer should wait while it quits); None (in-process use) waits for it."""
        self.conn = conn
        self.exit_grace = exit_grace
        self._served = threading.Event()
        self.inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._cancel_below = 0  # every job with a smaller number is cancelled ("cancel all"), but set-up
        self._setup: set[int] = set()  # queued set-up jobs (load_model, set_volume): "cancel all" spares them
        self._closing = False  # "shutdown" or the end of the connection: stop the running job, answer no more
        self.session = None
        self.model_info: dict[str, Any] = {}
        self.volume: dict[str, Any] | None = None  # kept so that loading another model keeps the volume
        self.idle_plan: deque[int] = deque()
        self._windows: dict[tuple, Any] = {}  # the window of the current volume and window choice
        self._running: list[int] = [0, 0, -1]  # job number, slices sent, slices sent when its cancel came
        self.idle_axis = "axial"

    # -- the channel ---------------------------------------------------------------------------------------
    def send(self, header: dict, arrays: dict | None = None) -> None:
        """Send a reply; once the connection is ending (a shutdown, or a malformed request closed it) a reply
        that cannot go out is dropped, since nobody is left to read it."""
        data = encode(header, arrays)
        with self._send_lock:
            try:
                self.conn.send_bytes(data)
            except OSError:
                if not self._closing:
                    raise

    def _read(self) -> None:
        """The reader thread: a cancel or a shutdown takes effect here, at once, also while a job runs. A
        message that breaks the protocol gets one error reply and ends the connection (and so the engine):
        nothing after it can be trusted to be framed right, and a reader that died on it would leave the
        engine deaf."""
        while True:
            header = None
            try:
                header, arrays = decode(self.conn.recv_bytes(MAX_MESSAGE_BYTES))
                check_request(header)
            except (EOFError, OSError):  # also a frame longer than the bound (the connection closes then)
                self._hang_up()
                return
            except Exception as error:  # ProtocolError, or anything else a malformed message caused
                self._refuse(header, error)
                return
            op = header.get("op")
            if op in ("cancel", "shutdown"):
                if op == "shutdown":
                    self._closing = True
                elif header.get("target") is None:
                    self._cancel_below = max(self._cancel_below, header["job"])
                    self.idle_plan.clear()  # pre-encoding is work too (a closed scene's volume, say)
                else:
                    self._cancelled.add(header["target"])
                running = self._running
                if self.cancelled(running[0]) and running[2] < 0:
                    running[2] = running[1]  # how far the running job was when the cancel arrived
                if op == "cancel":
                    continue
            if op in SETUP_OPS:
                self._setup.add(header["job"])
            self.inbox.put((header, arrays))
            if op == "shutdown":
                self._leave_after_grace()

    def _refuse(self, header: Any, error: BaseException) -> None:
        """One error reply for a malformed message, then the end of the connection."""
        message = f"the engine refused a malformed request: {one_line(error)}"
        log.error("%s", message)
        try:
            self.send({"job": job_number(header), "event": "error", "message": message, "details": message})
        except (OSError, ValueError):
            pass
        self._closing = True  # before the close: a reply the running job sends now is dropped, not an error
        with self._send_lock:
            self.conn.close()
        self._hang_up()

    def _hang_up(self) -> None:
        """The Slicer side is gone (or was hung up on): stop the running job, answer no more, and leave."""
        self._closing = True
        self.inbox.put(_EOF)
        self._leave_after_grace()

    def _leave_after_grace(self) -> None:
        if self.exit_grace is not None and not self._served.wait(self.exit_grace):
            log.info("the running job did not stop within %.1f s of the shutdown; leaving", self.exit_grace)
            leave()

    def cancelled(self, job: int) -> bool:
        if self._closing or job in self._cancelled:
            return True
        return job < self._cancel_below and job not in self._setup

    def check(self, job: int) -> None:
        if self.cancelled(job):
            raise JobCancelled

    # -- the loop ------------------------------------------------------------------------------------------
    def serve(self) -> None:
        threading.Thread(target=self._read, name="SAMMed2D engine reader", daemon=True).start()
        try:
            while not self._closing:
                try:
                    item = self.inbox.get(block=not self.idle_plan)
                except queue.Empty:
                    self._encode_one_idle_slice()
                    continue
                if item is _EOF or self._closing or item[0].get("op") == "shutdown":
                    return
                self._handle(*item)
        finally:
            self._served.set()

    def _handle(self, header: dict, arrays: dict) -> None:
        job = int(header.get("job", 0))
        op = header.get("op")
        handler: Callable | None = getattr(self, f"op_{op}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown request {op!r}")
            self.check(job)
            result = handler(job, header, arrays) or {}
            self.send({"job": job, "event": "done", **result})
        except JobCancelled:
            self.send({"job": job, "event": "cancelled"})
        except Exception as error:  # reported to the panel in one line; the details go to the log
            self.send({"job": job, "event": "error", "message": one_line(error),
                       "details": traceback.format_exc()})  # fmt: skip
        finally:
            self._setup.discard(job)

    # -- requests ------------------------------------------------------------------------------------------
    def op_ping(self, job: int, header: dict, arrays: dict) -> dict:
        return {"pid": os.getpid(), "python": sys.version.split()[0], "cwd": os.getcwd()}

    def op_load_model(self, job: int, header: dict, arrays: dict) -> dict:
        """Replace the model. The old one is dropped first, so a load that fails leaves none: work queued
        behind it then fails at once instead of running on a model the user has moved away from."""
        from ..engine import masks
        from ..engine.predictor import SamMed2DPredictor
        from ..engine.session import SegmentationSession
        from ..weights.checkpoint import load_model, resolve_device
        from ..weights.int8_weights import Int8WeightsFile

        if self.session is not None:  # its weights' preparation would compete with this load
            self.session.predictor.cancel_preparation()
        self.session, self.model_info, self._windows = None, {}, {}
        self.idle_plan.clear()  # it would encode with the old model
        device = resolve_device(header.get("device", "auto"))
        model, info = load_model(header["path"], device=device)
        int8_file = Int8WeightsFile.in_cache(info.sha256)  # kept between starts: packing only, next time
        predictor = SamMed2DPredictor(model, precision=header.get("precision", "auto"), int8_file=int8_file)
        predictor.prepare_in_background()  # ready by the user's first click, most often
        threading.Thread(target=masks.warm_up, name="SAMMed2D-warm-up", daemon=True).start()
        choice = predictor.precision_choice
        log.info("model %s on %s, precision %s (%s)", info.build, device, choice.precision, choice.reason)
        disk_cache = _disk_cache(header)
        from ..weights.registry import intensity_rule

        rule = intensity_rule(header.get("name") or header["path"])
        self.session = SegmentationSession(predictor, disk_cache=disk_cache, model_sha256=info.sha256,
                                           intensity_rule=rule)  # fmt: skip
        self._windows = {}  # "auto" depends on the model's rule
        self.model_info = {"path": header["path"], "device": str(device), "build": info.build,
                           "sha256": info.sha256, "precision": choice.precision,
                           "precision_reason": choice.reason}  # fmt: skip
        if self.volume is not None:
            self._set_session_volume()
        return self.model_info

    def op_set_volume(self, job: int, header: dict, arrays: dict) -> dict:
        from multiprocessing import shared_memory

        shape, dtype = tuple(header["shape"]), np.dtype(header["dtype"])
        shm = _attach_shared_memory(shared_memory, header["shm"])
        try:
            array = np.ndarray(shape, dtype=dtype, buffer=shm.buf).copy()  # the engine's own copy
        finally:
            shm.close()
        self.volume = {"array": array, "ijk_to_ras": np.array(header["ijk_to_ras"], dtype=np.float64),
                       "modality": header.get("modality"), "key": header["key"]}  # fmt: skip
        self.idle_plan.clear()
        if self.session is not None:
            self._set_session_volume()
        return {"key": header["key"]}

    def _set_session_volume(self) -> None:
        v = self.volume
        self.session.set_volume(v["array"], v["ijk_to_ras"], v["modality"], key=v["key"])

    def _require_session(self, header: dict):
        if self.session is None:
            raise RuntimeError("no model is loaded (choose one under Model)")
        if self.volume is None or self.volume["key"] != header.get("key"):
            raise RuntimeError("the volume was not sent to the engine; run the action again")
        from ..engine.session import window_for

        w = header.get("window") or {}
        spec = (self.volume["key"], w.get("choice", "auto"), w.get("level"), w.get("width"))
        if spec not in self._windows:  # "auto" looks at every voxel: once per volume, not once per click
            array, modality, rule = self.volume["array"], self.volume["modality"], self.session.intensity_rule
            self._windows = {spec: window_for(array, modality, *spec[1:], rule=rule)}
        self.session.set_window(self._windows[spec])
        return self.session

    def op_segment(self, job: int, header: dict, arrays: dict) -> dict:
        from ..engine.prompts import PointPrompt, RoiPrompt
        from ..engine.propagation import PropagationSettings

        session = self._require_session(header)
        points = [PointPrompt(tuple(p["position"]), int(p["label"]), p.get("name", ""))
                  for p in header["points"]]  # fmt: skip
        rois = [RoiPrompt(tuple(r["center"]), np.array(r["axes"]), tuple(r["size"]), r.get("name", ""))
                for r in header["rois"]]  # fmt: skip
        settings = PropagationSettings(**header.get("settings", {}))
        axis = header["axis"]
        shape = session.volume.geometry(axis).slice_shape
        seed_masks, current = _slice_masks(arrays, "seed_", shape), _slice_masks(arrays, "current_", shape)
        walk = session.propagate(points, rois, axis, header["direction"], settings, seed_masks or None,
                                 current or None)  # fmt: skip
        cancelled = False
        self._running = running = [job, 0, -1]
        try:
            for outcome in walk:
                fields = {"index": outcome.index, "status": outcome.status,
                          "iou": _finite(outcome.predicted_iou), "confidence": _finite(outcome.confidence),
                          "area": outcome.area_px, "reason": outcome.reason}  # fmt: skip
                masks = {"mask": pack_mask(outcome.mask)} if outcome.mask is not None else None
                self.send({"job": job, "event": "slice", **fields}, masks)
                running[1] += 1
                if self.cancelled(job):
                    cancelled = True
                    break
        finally:
            walk.close()
        last = session.last
        result = last.result
        return {
            "cancelled": cancelled,
            "axis": axis,
            "window": [last.window.low, last.window.high],
            "window_method": last.window.method,
            "seeds": sorted(last.seeds),
            "encoded": result.encoded_slices,
            "encode_seconds": result.encode_seconds,
            "total_seconds": result.total_seconds,
            "model": self.model_info,
            # slices finished after the cancel arrived: at most the one being computed then
            "slices_after_cancel": running[1] - running[2] if running[2] >= 0 else None,
        }

    def op_prefetch(self, job: int, header: dict, arrays: dict) -> dict:
        """Pre-encode from `center` outwards while idle (the whole volume, nearest first)."""
        from ..engine.session import nearest_first

        session = self._require_session(header)
        count = session.volume.geometry(header["axis"]).num_slices
        self.idle_axis = header["axis"]
        self.idle_plan = deque(nearest_first(int(header["center"]), count))
        return {"planned": len(self.idle_plan)}

    def _encode_one_idle_slice(self) -> None:
        try:
            index = self.idle_plan.popleft()
        except IndexError:  # a "cancel all" emptied the plan meanwhile (reader thread)
            return
        try:
            self.session.prefetch(self.idle_axis, [index])
        except Exception:  # pre-encoding is a courtesy: a failure shows up on the next real request
            log.exception("pre-encoding slice %d failed", index)
            self.idle_plan.clear()

    def op_export_dicom_seg(self, job: int, header: dict, arrays: dict) -> dict:
        import pydicom

        from ..formats.dicom.seg_write import (
            MaskBlock,
            SegmentSpec,
            parse_slicer_terminology,
            write_dicom_seg,
        )
        from ..formats.dicom.series import check_series_grid, series_affine, sort_series_datasets
        from ..formats.provenance import Provenance

        datasets = sort_series_datasets(pydicom.dcmread(f, stop_before_pixels=True) for f in header["files"])
        shape = tuple(header["shape"])
        check_series_grid(datasets, shape, np.array(header["ijk_to_ras"], dtype=np.float64))

        def unpacked(number: int, segment: dict) -> Callable[[], MaskBlock]:
            """Each segment arrives packed and cropped to its extent ("offset"/"shape"; the whole grid when
            absent); it is unpacked only when the writer reaches it, so one is held at a time."""
            offset = tuple(segment.get("offset", (0, 0, 0)))
            block_shape = tuple(segment.get("shape", shape))
            return lambda: MaskBlock(offset, unpack_mask(arrays[f"segment_{number}"], block_shape))

        specs = []
        for number, segment in enumerate(header["segments"]):
            category, kind = parse_slicer_terminology(segment.get("terminology", ""))
            provenance = segment.get("provenance")
            specs.append(SegmentSpec(
                label=segment["label"], mask_kji=unpacked(number, segment),
                color_rgb=tuple(segment["color"]), category=category, type=kind,
                provenance=Provenance.from_metadata(provenance) if provenance else None,
            ))  # fmt: skip
        written = write_dicom_seg(datasets, specs, header["out"], model_hash=header["model_sha256"],
                                  algorithm_name=header.get("algorithm_name", "SAM-Med2D"),
                                  mask_affine=series_affine(datasets))  # fmt: skip
        return {"path": str(written)}

    def op_download(self, job: int, header: dict, arrays: dict) -> dict:
        from ..weights import registry

        def progress(done: int, total: int | None) -> None:
            self.send({"job": job, "event": "progress", "done": done, "total": total})

        try:
            path = registry.fetch_model(registry.REGISTRY[header["model"]], progress=progress,
                                        cancel=lambda: self.cancelled(job))  # fmt: skip
        except registry.DownloadCancelled:
            raise JobCancelled from None
        return {"path": str(path)}


def _disk_cache(header: dict):
    """The embeddings folder: on by default under the cache folder (`disk_cache`: false turns it off,
    `disk_cache_dir` / `disk_cache_mb` move or bound it)."""
    from ..engine.disk_cache import DEFAULT_DISK_BYTES, DiskEmbeddingCache
    from ..weights.cache_dir import default_cache_dir

    if header.get("disk_cache", True) is False:
        return None
    folder = header.get("disk_cache_dir") or default_cache_dir() / "embeddings"
    mb = header.get("disk_cache_mb")
    return DiskEmbeddingCache(folder, DEFAULT_DISK_BYTES if mb is None else int(mb) << 20)


def _attach_shared_memory(shared_memory: Any, name: str) -> Any:
    """Attach without handing the block to this process's resource tracker: the Slicer side made it and
    unlinks it (Python < 3.13 would otherwise unlink it again, with a warning, when the engine exits)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python 3.13+
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
        if os.name == "posix":
            from multiprocessing import resource_tracker

            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001 (the tracker's own key)
        return shm


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _leave_our_folder(cwd: str | None) -> None:
    """Move to the Slicer side's working folder without importing from it: the client starts the engine in
    the library's own folder, since `python -m` puts the working folder first on sys.path (a `queue.py` in
    Slicer's folder would run here otherwise); every path entry is made absolute first, so that an empty or
    relative one (from PYTHONPATH, say) keeps naming our folder, not the new one."""
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as error:
            log.warning("staying in %s: %s", os.getcwd(), one_line(error))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SAMMed2DSegmentLib.service")
    parser.add_argument("--address", required=True, help="HOST:PORT of the Slicer side's listener")
    parser.add_argument("--package-dir", action="append", default=[],
                        help="private package folder put first on sys.path (this process only)")  # fmt: skip
    parser.add_argument("--cwd", help="the Slicer side's working folder, for relative paths in requests")
    args = parser.parse_args(argv)
    for folder in reversed(args.package_dir):
        sys.path.insert(0, folder)
    _leave_our_folder(args.cwd)
    key = os.environ.pop(AUTHKEY_ENV, "")
    if not key:
        print(f"{AUTHKEY_ENV} is not set: the engine is started by the SAMMed2D module", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="SAMMed2D engine: %(message)s")
    host, port = args.address.rsplit(":", 1)
    conn = connect_engine(host, int(port), bytes.fromhex(key))
    try:
        EngineServer(conn, exit_grace=EXIT_GRACE).serve()
    finally:
        conn.close()
    leave()


def leave() -> NoReturn:
    """Exit the engine process without the interpreter's teardown (about a second with torch loaded, while
    Slicer waits for it to quit): nothing needs it. Files are written atomically, the shared memory is the
    Slicer side's to release, and the log is flushed here."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def _slice_masks(arrays: dict, prefix: str, shape: tuple[int, int]) -> dict[int, np.ndarray]:
    """The masks a job sent as `<prefix><slice index>` arrays, by slice index."""
    return {int(name[len(prefix):]): unpack_mask(bits, shape) for name, bits in arrays.items()
            if name.startswith(prefix)}  # fmt: skip
