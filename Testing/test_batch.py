"""`batch` and `evaluate --manifest` on real Dask clusters (a LocalCluster of worker processes, and a
`dask scheduler` with a `dask worker` started as separate processes on loopback), with the demo model on a
crop of the bundled CT (4 slices around the liver point, so each case takes seconds)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SAMMed2DSegmentLib.cohort.runner import LOST
from SAMMed2DSegmentLib.commands import main
from SAMMed2DSegmentLib.model.int8_linear import int8_available

from .conftest import CT
from .crash_on_case import CASE as CRASH
from .terminal import sigint_as_in_a_terminal
from .test_cli import read_segment, write_points

LIB = Path(__file__).resolve().parents[1] / "SAMMed2DSegment"
LABELS = CT.parent / "labels" / "labels_on_ct_grid.nrrd"
LIVER = 5


def crop(image: sitk.Image, index: tuple[int, int, int]) -> sitk.Image:
    """4 slices and 160×160 pixels around `index` (i, j, k): small enough for seconds per case."""
    i, j, k = index
    return image[i - 80 : i + 80, j - 80 : j + 80, k - 2 : k + 2]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A manifest folder: the cropped CT, its labels, the liver point, a point far off the volume."""
    root = tmp_path_factory.mktemp("cohort")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT)))
    ct = reader.Execute()
    labels = sitk.ReadImage(str(LABELS))
    array = sitk.GetArrayFromImage(labels)
    ys, xs = np.nonzero(array[10] == LIVER)
    centre = (int(np.median(xs)), int(np.median(ys)), 10)
    sitk.WriteImage(crop(ct, centre), str(root / "ct.nrrd"))
    sitk.WriteImage(crop(labels, centre), str(root / "labels.nrrd"))
    point = labels.TransformIndexToPhysicalPoint(centre)
    write_points(root / "liver.mrk.json", [point])
    write_points(root / "far.mrk.json", [(point[0], point[1], point[2] + 500.0)])
    return root


def manifest(root: Path, name: str, rows: list[str], header: str = "case,volume,include,propagate") -> Path:
    path = root / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


ROWS = [
    "c1,ct.nrrd,liver.mrk.json,none",
    "c2,ct.nrrd,liver.mrk.json,up",
    "c3,ct.nrrd,liver.mrk.json,",
    "off,ct.nrrd,far.mrk.json,none",
]
ROWS_DONE = ("c1", "c2", "c3")  # the rows of ROWS[:3]
COMMON = ["--precision", "fp32", "--quiet"]


def batch(*args: str) -> int:
    return main(["batch", *args, *COMMON])


def summary(out: Path) -> dict[str, dict]:
    return {row["case"]: row for row in json.loads((out / "summary.json").read_text())["cases"]}


def leftovers(out: Path) -> list[str]:
    """Anything in OUT that is neither a complete case folder nor a summary file."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def finished(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def first_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    cases = manifest(cohort, "cases.csv", ROWS)
    status = batch("--manifest", str(cases), "--out-dir", str(out), "--workers", "2")
    return {"status": status, "out": out, "manifest": cases}


def test_cases_run_isolated_and_each_matches_segment_alone(first_run, cohort, tmp_path):
    out = first_run["out"]
    assert first_run["status"] == 1
    rows = summary(out)
    assert {c: r["status"] for c, r in rows.items()} == {
        "c1": "done",
        "c2": "done",
        "c3": "done",
        "off": "failed",
    }
    assert "outside" in rows["off"]["reason"] or "off" in rows["off"]["reason"], rows["off"]["reason"]
    assert not (out / "off").exists() and leftovers(out) == []
    assert (out / "summary.csv").read_text().splitlines()[0] == "case,status,reason,slices,seconds,worker"
    for case, propagate in (("c1", "none"), ("c2", "up"), ("c3", "both")):
        alone = tmp_path / f"{case}.seg.nrrd"
        prompt = ["--include", str(cohort / "liver.mrk.json"), "--propagate", propagate]
        volume = ["--volume", str(cohort / "ct.nrrd")]
        assert main(["segment", *volume, *prompt, "--out", str(alone), *COMMON]) == 0
        batched = out / case / f"{case}.seg.nrrd"
        mask = read_segment(batched, cohort / "ct.nrrd", "SAM-Med2D")
        assert mask.any()
        np.testing.assert_array_equal(mask, read_segment(alone, cohort / "ct.nrrd", "SAM-Med2D"))
        assert batched.read_bytes() == alone.read_bytes()  # byte-identical, whichever worker ran it
        report = json.loads((out / case / "report.json").read_text())
        assert report["output"] == str(batched) and report["slices_written"]
        assert rows[case]["worker"] == report["batch"]["worker"]


def test_the_model_loads_once_per_worker(first_run):
    reports = [json.loads((first_run["out"] / c / "report.json").read_text()) for c in ("c1", "c2", "c3")]
    workers = {r["batch"]["worker"] for r in reports}
    assert len(workers) == 2  # both workers took cases; one of them two or more
    assert [r["batch"]["model_loads"] for r in reports] == [1, 1, 1]


@pytest.mark.skipif(not int8_available(), reason="int8: this PyTorch has no dynamic int8 products here")
def test_a_worker_prepares_its_low_precision_encoder_once(cohort, tmp_path):
    """int8 packs its weights per encoder: a worker's cases share the one its first case prepared."""
    out = tmp_path / "out"
    cases = manifest(cohort, "int8.csv", ROWS[:2])
    argv = ["--manifest", str(cases), "--out-dir", str(out), "--workers", "1"]
    assert main(["batch", *argv, "--precision", "int8", "--device", "cpu", "--quiet"]) == 0
    reports = [json.loads((out / case / "report.json").read_text()) for case in ("c1", "c2")]
    assert [r["precision"]["used"] for r in reports] == ["int8", "int8"]
    assert [r["batch"]["encoder_preparations"] for r in reports] == [1, 1]


def test_resume_skips_unchanged_cases_and_reruns_a_changed_row(first_run, cohort, scheduler):
    out = first_run["out"]
    done = {c: (out / c / f"{c}.seg.nrrd").stat().st_mtime_ns for c in ("c1", "c2", "c3")}
    resume = manifest(cohort, "resume.csv", ROWS[:3])
    assert batch("--manifest", str(resume), "--out-dir", str(out), "--resume") == 0  # no cluster needed
    assert {r["status"] for r in summary(out).values()} == {"skipped"}
    assert {c: (out / c / f"{c}.seg.nrrd").stat().st_mtime_ns for c in done} == done

    changed = manifest(cohort, "changed.csv", [*ROWS[:2], "c3,ct.nrrd,liver.mrk.json,down"])
    assert batch("--manifest", str(changed), "--out-dir", str(out), "--resume", "--scheduler", scheduler) == 0
    rows = summary(out)
    assert [rows[c]["status"] for c in ("c1", "c2", "c3")] == ["skipped", "skipped", "done"]
    assert (out / "c3" / "c3.seg.nrrd").stat().st_mtime_ns != done["c3"]
    assert json.loads((out / "c3" / "report.json").read_text())["propagate"] == "down"
    assert leftovers(out) == []


def test_a_folder_that_is_not_a_case_folder_is_not_replaced(cohort, tmp_path, capsys):
    mine = tmp_path / "out" / "c1" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    status = batch(
        "--manifest", str(manifest(cohort, "one.csv", ROWS[:1])), "--out-dir", str(tmp_path / "out")
    )
    assert status == 2 and "is not a batch case folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.joinpath("out").rglob("*")) == ["c1", "notes.txt"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (["c1,ct.nrrd,missing.mrk.json,none"], "does not exist"),
        (["c1,ct.nrrd,liver.mrk.json,sideways"], "propagate 'sideways'"),
        (["c1,ct.nrrd,liver.mrk.json,none", "c1,ct.nrrd,liver.mrk.json,up"], "already on line 2"),
        (["../up,ct.nrrd,liver.mrk.json,none"], "not a usable folder name"),
        (["c1,ct.nrrd,,none"], "has no prompt"),
    ],
)
def test_a_bad_manifest_is_one_line_and_writes_nothing(cohort, tmp_path, capsys, rows, message):
    out = tmp_path / "out"
    status = main(["batch", "--manifest", str(manifest(cohort, "bad.csv", rows)), "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dask", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A real `dask scheduler` and one `dask worker` (2 threads), separate processes on loopback."""
    folder = tmp_path_factory.mktemp("dask")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")])}
    file = folder / "scheduler.json"
    processes = [_start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                         "--scheduler-file", str(file)], env)]  # fmt: skip
    deadline = time.monotonic() + 60
    while not file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(file.read_text())["address"]
    processes.append(
        _start(["worker", address, "--nthreads", "2", "--no-dashboard", "--host", "127.0.0.1"], env)
    )
    yield address
    for process in processes[::-1]:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_batch_on_an_existing_scheduler(scheduler, cohort, tmp_path, first_run):
    out = tmp_path / "out"
    cases = manifest(cohort, "two.csv", [ROWS[0], ROWS[3]])
    assert batch("--manifest", str(cases), "--out-dir", str(out), "--scheduler", scheduler) == 1
    rows = summary(out)
    assert rows["c1"]["status"] == "done" and rows["off"]["status"] == "failed"
    assert rows["c1"]["worker"].startswith("tcp://127.0.0.1:")
    assert leftovers(out) == []
    local = first_run["out"] / "c1" / "c1.seg.nrrd"  # the same case on another cluster's worker
    assert (out / "c1" / "c1.seg.nrrd").read_bytes() == local.read_bytes()


def test_evaluate_over_a_manifest(scheduler, cohort, tmp_path):
    cases = manifest(cohort, "eval.csv", ["a,ct.nrrd,labels.nrrd,5,liver", "b,ct.nrrd,labels.nrrd,5,liver"],
                     header="case,volume,labels,label_value,segment_name")  # fmt: skip
    result = tmp_path / "eval.json"
    assert main(["evaluate", "--manifest", str(cases), "--json", str(result), "--scheduler", scheduler,
                 "--max-clicks", "1", *COMMON]) == 0  # fmt: skip
    table = json.loads(result.read_text())
    per_case = [json.loads((tmp_path / "eval" / f"{c}.json").read_text()) for c in ("a", "b")]
    finals = [r["final_dice"] for r in per_case]
    liver = table["structures"]["liver"]["final_dice"]
    assert liver["n"] == 2 and liver["mean"] == pytest.approx(np.mean(finals))
    assert liver["sd"] == pytest.approx(np.std(finals, ddof=1))
    assert [r["status"] for r in table["cases"]] == ["done", "done"]


def test_evaluate_resume_keeps_unchanged_cases_and_reruns_changed_ones(scheduler, cohort, tmp_path):
    """--resume keeps a case's result while its row, inputs, model and options are unchanged (its scores
    still count in the summary); a changed row reruns that case, a changed option every case."""
    header = "case,volume,labels,label_value,segment_name"
    rows = ["a,ct.nrrd,labels.nrrd,5,liver", "b,ct.nrrd,labels.nrrd,5,liver"]
    cases = manifest(cohort, "eval-resume.csv", rows, header=header)
    result = tmp_path / "eval.json"
    run = ["evaluate", "--manifest", str(cases), "--json", str(result), "--scheduler", scheduler, *COMMON]
    assert main([*run, "--max-clicks", "1"]) == 0
    first = json.loads(result.read_text())
    per_case = {c: tmp_path / "eval" / f"{c}.json" for c in ("a", "b")}
    written = {c: p.stat().st_mtime_ns for c, p in per_case.items()}

    assert main([*run, "--max-clicks", "1", "--resume"]) == 0
    kept = json.loads(result.read_text())
    assert [r["status"] for r in kept["cases"]] == ["skipped", "skipped"]
    assert kept["structures"] == first["structures"] and kept["counts"]["skipped"] == 2
    assert {c: p.stat().st_mtime_ns for c, p in per_case.items()} == written

    manifest(cohort, "eval-resume.csv", [rows[0], "b,ct.nrrd,labels.nrrd,5,liver (again)"], header=header)
    assert main([*run, "--max-clicks", "1", "--resume"]) == 0
    assert [r["status"] for r in json.loads(result.read_text())["cases"]] == ["skipped", "done"]
    assert per_case["a"].stat().st_mtime_ns == written["a"] != per_case["b"].stat().st_mtime_ns

    assert main([*run, "--max-clicks", "2", "--resume"]) == 0
    assert [r["status"] for r in json.loads(result.read_text())["cases"]] == ["done", "done"]
    assert all(len(json.loads(p.read_text())["dice_per_click"]) == 3 for p in per_case.values())


def test_evaluate_resume_with_saved_masks_reruns_a_case_whose_mask_is_gone(scheduler, cohort, tmp_path):
    """--resume with --save-masks keeps a case only while its mask is there too: after one mask is removed,
    that case runs again and writes it back; the other case's result and mask stay untouched."""
    header = "case,volume,labels,label_value,segment_name"
    rows = ["a,ct.nrrd,labels.nrrd,5,liver", "b,ct.nrrd,labels.nrrd,5,liver"]
    cases = manifest(cohort, "eval-masks.csv", rows, header=header)
    result, masks = tmp_path / "eval.json", tmp_path / "masks"
    run = ["evaluate", "--manifest", str(cases), "--json", str(result), "--scheduler", scheduler,
           "--protocol", "cvpr25", "--save-masks", str(masks), *COMMON]  # fmt: skip
    assert main(run) == 0
    saved = {c: sorted((masks / c).glob("*.seg.nrrd")) for c in ("a", "b")}
    assert all(len(files) == 1 for files in saved.values()), saved
    per_case = {c: tmp_path / "eval" / f"{c}.json" for c in ("a", "b")}
    written = {c: (p.stat().st_mtime_ns, saved[c][0].stat().st_mtime_ns) for c, p in per_case.items()}

    saved["a"][0].unlink()
    assert main([*run, "--resume"]) == 0
    assert [r["status"] for r in json.loads(result.read_text())["cases"]] == ["done", "skipped"]
    assert saved["a"][0].is_file() and per_case["a"].stat().st_mtime_ns != written["a"][0]
    assert (per_case["b"].stat().st_mtime_ns, saved["b"][0].stat().st_mtime_ns) == written["b"]


def test_a_kept_result_needs_its_digest_and_its_mask(tmp_path):
    """--resume keeps a case's result only when it is whole JSON, records this run's digest, and (with
    --save-masks) its mask is there; a result of an older version has no digest and runs again."""
    from SAMMed2DSegmentLib.cohort.evaluation import kept_result

    result, mask = tmp_path / "a.json", tmp_path / "a.seg.nrrd"
    document = {"volume": "ct.nrrd", "protocol": "clicks", "final_dice": 0.9, "batch": {"digest": "d1"}}
    result.write_text(json.dumps(document))
    assert kept_result(result, "d1") == document
    assert kept_result(result, "d2") is None
    assert kept_result(result, "d1", mask) is None
    mask.write_bytes(b"NRRD")
    assert kept_result(result, "d1", mask) == document
    result.write_text(json.dumps({k: v for k, v in document.items() if k != "batch"}))
    assert kept_result(result, "d1") is None
    result.write_text(json.dumps(document)[:40])
    assert kept_result(result, "d1") is None
    assert kept_result(tmp_path / "missing.json", "d1") is None


def test_the_resume_digest_changes_with_the_package_or_torch_version(tmp_path, monkeypatch):
    """A cohort resumed after an upgrade runs its cases again instead of mixing two versions' results."""
    import importlib.metadata

    import SAMMed2DSegmentLib
    from SAMMed2DSegmentLib.cohort.digest import case_digest
    from SAMMed2DSegmentLib.cohort.manifest import Case

    (tmp_path / "ct.nrrd").write_bytes(b"voxels")
    case = Case("a", {"case": "a", "volume": "ct.nrrd"}, 2, {"volume": (tmp_path / "ct.nrrd",)})
    digest = case_digest(case, "5e" * 32, {"precision": "fp32"})
    assert case_digest(case, "5e" * 32, {"precision": "fp32"}) == digest
    real = importlib.metadata.version

    def torch_upgraded(name: str) -> str:
        return "9.9.9" if name == "torch" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", torch_upgraded)
    assert case_digest(case, "5e" * 32, {"precision": "fp32"}) != digest
    monkeypatch.setattr(importlib.metadata, "version", real)
    monkeypatch.setattr(SAMMed2DSegmentLib, "__version__", "9.9.9")
    assert case_digest(case, "5e" * 32, {"precision": "fp32"}) != digest


def test_a_worker_with_other_versions_than_the_client_fails_its_cases(monkeypatch):
    """The resume digest records the client's versions: a worker running another torch fails each case in
    one line (before loading anything), instead of making results a later --resume keeps as the client's."""
    import importlib.metadata

    import SAMMed2DSegmentLib
    from SAMMed2DSegmentLib.cohort import worker
    from SAMMed2DSegmentLib.cohort.worker import CaseTask, run_case, software_mismatch

    task = CaseTask("a", "segment", ("--volume", "missing.nrrd", "--out", "a.seg.nrrd"), "5e" * 32)
    assert task.software["torch"] == importlib.metadata.version("torch")
    real = importlib.metadata.version

    def upgraded(name: str) -> str:
        return "9.9.9" if name == "torch" else real(name)

    def other_build(name: str) -> str:  # the same release, built for CUDA: the same software here
        return real(name).split("+")[0] + "+cu128" if name == "torch" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", other_build)
    assert software_mismatch(task.software) == ""

    monkeypatch.setattr(importlib.metadata, "version", upgraded)  # the worker's torch, from here on
    loads = worker._loads
    outcome = run_case(task)
    ours = f"sammed2d {SAMMed2DSegmentLib.__version__}"
    assert outcome.status == "failed" and worker._loads == loads
    assert outcome.reason.startswith(f"this worker runs {ours}, torch 9.9.9, the client {ours}, torch ")
    assert outcome.reason.endswith("install the same versions")


def test_ctrl_c_leaves_no_partial_case_folder(cohort, tmp_path):
    out = tmp_path / "out"
    cases = manifest(cohort, "slow.csv", [f"s{n},ct.nrrd,liver.mrk.json,both" for n in range(4)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LIB), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "SAMMed2DSegmentLib", "batch", "--manifest", str(cases), "--out-dir", str(out),
         "--workers", "1", *COMMON], env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
         preexec_fn=sigint_as_in_a_terminal,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out.is_dir() and finished(out)):
        time.sleep(0.1)  # the first case is in place, the next ones are being written
    assert finished(out), "no case finished"
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted; " in err.splitlines()[-1]
    assert leftovers(out) == []  # no temporary case folder, no lock
    assert 1 <= len(finished(out)) < 4
    for folder in finished(out):
        assert sorted(f.name for f in folder.iterdir()) == ["report.json", f"{folder.name}.seg.nrrd"]
    assert not (out / "summary.json").exists()


def test_a_case_that_kills_its_worker_fails_alone_and_resume_reruns_it(
    cohort, first_run, scheduler, tmp_path
):
    """Case `crash` kills its worker process once the case has written its files (crash_on_case.py); the
    nanny starts a new worker. That case alone fails, nothing of it stays, and --resume runs only it."""
    import dask

    out = tmp_path / "out"
    cases = manifest(cohort, "crash.csv", [f"{CRASH},ct.nrrd,liver.mrk.json,none", *ROWS[:3]])
    preload = str(Path(__file__).with_name("crash_on_case.py"))
    with dask.config.set({"distributed.worker.preload": [preload]}):
        assert batch("--manifest", str(cases), "--out-dir", str(out), "--workers", "2") == 1
    rows = summary(out)
    assert {c: r["status"] for c, r in rows.items()} == {CRASH: "failed", **dict.fromkeys(ROWS_DONE, "done")}
    assert rows[CRASH]["reason"] == LOST
    assert rows[CRASH]["worker"].startswith("tcp://127.0.0.1:")  # where it died
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        assert {r["case"]: r["reason"] for r in csv.DictReader(fh)}[CRASH] == LOST
    assert leftovers(out) == [] and [p.name for p in finished(out)] == ["c1", "c2", "c3"]
    for case in ("c1", "c2"):  # the first run's c3 may since have been rerun from another row (resume test)
        expected = (first_run["out"] / case / f"{case}.seg.nrrd").read_bytes()
        assert (out / case / f"{case}.seg.nrrd").read_bytes() == expected
    assert {f.name for f in (out / "c3").iterdir()} == {"report.json", "c3.seg.nrrd"}
    kept = {c: (out / c / f"{c}.seg.nrrd").stat().st_mtime_ns for c in ROWS_DONE}

    assert batch("--manifest", str(cases), "--out-dir", str(out), "--resume", "--scheduler", scheduler) == 0
    rows = summary(out)
    assert {c: r["status"] for c, r in rows.items()} == {CRASH: "done", **dict.fromkeys(kept, "skipped")}
    assert {c: (out / c / f"{c}.seg.nrrd").stat().st_mtime_ns for c in kept} == kept
    assert {f.name for f in (out / CRASH).iterdir()} == {"report.json", f"{CRASH}.seg.nrrd"}
    same_row = (first_run["out"] / "c1" / "c1.seg.nrrd").read_bytes()  # c1's row under another name
    assert (out / CRASH / f"{CRASH}.seg.nrrd").read_bytes() == same_row
    assert leftovers(out) == []
