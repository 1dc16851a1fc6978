"""The engine process against the model in this process, measured in one run (prints, asserts nothing).

1. Click → mask on a cached slice: through the client and the engine process (request, decoder, packed mask
   back, unpacked) against the same session call in this process.
2. Propagation over the bundled 20-slice CT while the calling thread holds the GIL the way PythonQt's main
   thread does (a busy Python loop under sys.setswitchinterval(0.05)), against an idle caller, for the engine
   process and for a worker thread in this process (the module's former design). A ratio near 1.0 means the
   caller's GIL does not slow the model.
"""

from __future__ import annotations

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


def busy_until(event: threading.Event) -> None:
    """A main thread that keeps the GIL, switching only every 50 ms (PythonQt's main thread, roughly)."""
    x = 0
    while not event.is_set():
        x += 1


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

    client_key = [None]

    def fresh_volume_client() -> None:
        client_key[0] = f"k{time.perf_counter()}"
        client.wait(client.submit_volume(ct.array_kji, {"ijk_to_ras": ct.ijk_to_ras.tolist(),
                                                        "key": client_key[0]}), 120)  # fmt: skip

    def timed_client() -> float:
        fresh_volume_client()  # no cached embeddings: the full propagation runs
        return run_client_segment(client, {**base, "key": client_key[0], "direction": "both"}, shape)

    def timed_thread() -> float:
        session.set_volume(ct.array_kji, ct.ijk_to_ras, key=f"t{time.perf_counter()}")
        finished = threading.Event()
        start = time.perf_counter()
        worker = threading.Thread(target=lambda: (list(session.propagate(prompt, (), "axial", "both")),
                                                  finished.set()))  # fmt: skip
        worker.start()
        while not finished.is_set():
            time.sleep(0.0005)  # an idle main thread
        worker.join()
        return time.perf_counter() - start

    def under_gil(fn) -> float:
        previous = sys.getswitchinterval()
        sys.setswitchinterval(0.05)
        stop = threading.Event()
        result = []
        try:
            if fn is timed_client:
                fresh_volume_client()
                start = time.perf_counter()

                def run() -> None:
                    run_client_segment(client, {**base, "key": client_key[0], "direction": "both"}, shape)
                    result.append(time.perf_counter() - start)
                    stop.set()

                # The client is polled from the busy thread's own ticks in Slicer; here from a side thread.
                threading.Thread(target=run).start()
                busy_until(stop)
            else:
                session.set_volume(ct.array_kji, ct.ijk_to_ras, key=f"g{time.perf_counter()}")
                start = time.perf_counter()

                def run() -> None:
                    list(session.propagate(prompt, (), "axial", "both"))
                    result.append(time.perf_counter() - start)
                    stop.set()

                threading.Thread(target=run).start()
                busy_until(stop)
        finally:
            sys.setswitchinterval(previous)
        return result[0]

    print("propagation over the 20-slice CT, s (caller idle / caller holding the GIL, ratio):")
    for name, fn in (("engine process", timed_client), ("thread in this process", timed_thread)):
        idle = fn()
        held = under_gil(fn)
        print(f"  {name}: {idle:.2f} / {held:.2f}  ratio {held / idle:.2f}")
    client.close()


if __name__ == "__main__":
    main()
