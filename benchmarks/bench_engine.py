"""The engine process against the model in this process, measured in one run (prints, asserts nothing).

1. Click → mask on a cached slice: through the client and the engine process (request, decoder, packed mask
   back, unpacked) against the same session call in this process.
2. Propagation over the bundled 20-slice CT while the main thread polls every 50 ms and, between polls, waits
   idle, keeps the GIL while blocked in C (what PythonQt's main thread does in the Qt event loop), or spins
   in a busy Python loop under sys.setswitchinterval(0.05) (which on 2 cores also takes a core from the
   model); for the engine process and for a worker thread in this process (the module's former design). A
   ratio near 1.0 means the main thread's GIL does not slow the model.

`--cold-start [--compare-with FOLDER]` prints the cold-start breakdown instead (`cold_start.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SAMMed2DSegment"))

from SAMMed2DSegmentLib.engine.predictor import SamMed2DPredictor  # noqa: E402
from SAMMed2DSegmentLib.engine.prompts import PointPrompt  # noqa: E402
from SAMMed2DSegmentLib.engine.session import SegmentationSession  # noqa: E402
from SAMMed2DSegmentLib.formats.volumes import read_volume  # noqa: E402
from SAMMed2DSegmentLib.service.client import EngineClient  # noqa: E402
from SAMMed2DSegmentLib.service.protocol import unpack_mask  # noqa: E402
from SAMMed2DSegmentLib.weights.checkpoint import load_model  # noqa: E402
from SAMMed2DSegmentLib.weights.registry import resolve_model  # noqa: E402

CT = ROOT / "Testing" / "Data" / "totalseg-example-ct" / "ct"
POINT_RAS = (93.26171875, 129.89453125, -784.5)


TICK_S = 0.05  # the module's poll timer interval


_LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))  # PyDLL calls keep the GIL, as PythonQt's event loop


def drive(poll, finished, mode: str) -> None:
    """The main thread as Slicer runs it: between two timer ticks it waits, then polls. "idle": waits with the
    GIL released. "blocked": waits in a C call that keeps the GIL and uses no CPU (PythonQt's main thread in
    the Qt event loop). "busy": a busy Python loop under sys.setswitchinterval(TICK_S), the issue's emulation;
    on 2 cores it also takes a whole core from the model."""
    while not finished():
        if mode == "busy":
            end = time.perf_counter() + TICK_S
            while time.perf_counter() < end:
                pass
        elif mode == "blocked":
            _LIBC.usleep(int(TICK_S * 1e6))
        else:
            time.sleep(TICK_S)
        poll()


def run_client_segment(client, header, shape) -> float:
    start = time.perf_counter()
    done = []

    def on_event(kind, reply, arrays):
        if kind == "slice" and "mask" in arrays:
            unpack_mask(arrays["mask"], shape)
        if kind in ("done", "error"):
            done.append(kind)

    job = client.submit("segment", header, on_event=on_event)
    client.wait(job, interval=0.0005)
    assert done == ["done"], done
    return time.perf_counter() - start


def main() -> None:
    ct = read_volume(CT)
    path = str(resolve_model("demo"))
    point = [{"position": list(POINT_RAS), "label": 1}]
    key = "bench"
    base = {"key": key, "axis": "axial", "window": {"choice": "auto"}, "settings": {}, "points": point,
            "rois": []}  # fmt: skip

    client = EngineClient()
    client.wait(client.submit("load_model", {"path": path, "device": "cpu"}), 120)
    client.wait(client.submit_volume(ct.array_kji, {"ijk_to_ras": ct.ijk_to_ras.tolist(), "key": key}), 120)
    shape = ct.array_kji.shape[1:]
    run_client_segment(client, {**base, "direction": "none"}, shape)  # encodes slice 10 once
    hop = [run_client_segment(client, {**base, "direction": "none"}, shape) for _ in range(30)]

    model, _ = load_model(path, device="cpu")
    session = SegmentationSession(SamMed2DPredictor(model))
    session.set_volume(ct.array_kji, ct.ijk_to_ras, key=key)
    prompt = [PointPrompt(POINT_RAS, 1)]
    list(session.propagate(prompt, (), "axial", "none"))
    local = []
    for _ in range(30):
        start = time.perf_counter()
        list(session.propagate(prompt, (), "axial", "none"))
        local.append(time.perf_counter() - start)

    def pct(values, q):
        return sorted(values)[int(q * (len(values) - 1))] * 1000

    print("click -> mask on a cached slice (demo model, 512x512 CT slice), ms:")
    print(f"  engine process: median {statistics.median(hop) * 1000:.1f}  p90 {pct(hop, 0.9):.1f}")
    print(f"  in this process: median {statistics.median(local) * 1000:.1f}  p90 {pct(local, 0.9):.1f}")
    print(f"  process hop adds: {(statistics.median(hop) - statistics.median(local)) * 1000:.1f} ms (median)")

    def propagate_in_engine(mode: str) -> float:
        key_now = f"k{time.perf_counter()}"  # a new volume key: no cached embeddings, the whole walk runs
        header = {"ijk_to_ras": ct.ijk_to_ras.tolist(), "key": key_now}
        client.wait(client.submit_volume(ct.array_kji, header))
        done = []
        start = time.perf_counter()
        job = client.submit(
            "segment",
            {**base, "key": key_now, "direction": "both"},
            on_event=lambda kind, reply, arrays: kind == "slice" or done.append(kind),
        )
        drive(client.poll, lambda: job.number not in client.jobs, mode)
        assert done == ["done"], done
        return time.perf_counter() - start

    def propagate_in_thread(mode: str) -> float:
        session.set_volume(ct.array_kji, ct.ijk_to_ras, key=f"t{time.perf_counter()}")
        finished = threading.Event()
        start = time.perf_counter()

        def walk() -> None:
            list(session.propagate(prompt, (), "axial", "both"))
            finished.set()

        threading.Thread(target=walk).start()
        drive(lambda: None, finished.is_set, mode)
        return time.perf_counter() - start

    previous = sys.getswitchinterval()
    sys.setswitchinterval(TICK_S)  # in every mode, so only what the main thread does differs
    try:
        rows = [
            (name, fn("idle"), fn("blocked"), fn("busy"))
            for name, fn in (
                ("engine process", propagate_in_engine),
                ("thread in this process", propagate_in_thread),
            )
        ]
    finally:
        sys.setswitchinterval(previous)
    print("propagation over the 20-slice CT, polled every 50 ms, s: main thread idle / keeping the GIL while")
    print("blocked in C (as PythonQt) / busy Python loop (also takes a core); ratios to idle:")
    for name, idle, blocked, busy in rows:
        ratios = f"{blocked / idle:.2f} / {busy / idle:.2f}"
        print(f"  {name}: {idle:.2f} / {blocked:.2f} / {busy:.2f}  ratios {ratios}")
    client.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cold-start"]:
        sys.path.insert(0, str(Path(__file__).parent))
        from cold_start import main as cold_start

        cold_start(sys.argv[2:])
    else:
        main()
