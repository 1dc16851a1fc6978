"""benchmarks/bench_precisions.py without a GPU: the one-line refusal, and the `--device cpu --quick` dry run
that goes through every row of the table (the same code path as on CUDA, small build)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from SAMMed2DSegmentLib.model.int8_linear import int8_available

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_precisions.py"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_without_cuda_it_refuses_in_one_line():
    result = _run(CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu" in lines[0]


def _row(text: str, first: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{text}")


def test_the_cpu_dry_run_prints_every_row_and_writes_the_table(tmp_path):
    result = _run("--device", "cpu", "--quick", OUT=str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("device: ") and "torch " in text and "CUDA " in text
    assert re.search(r"official formulation's [\d.]+ GFLOP", text)
    fp32, bf16, fp16, int8 = (_row(text, p) for p in ("fp32", "bf16", "fp16", "int8"))
    assert "flags " in text.splitlines()[0]  # the CPU's name and flags
    for row in (fp32, bf16):
        assert float(row[1]) > 0 and row[3].endswith("%")
        assert float(row[4]) >= 0.9999 and float(row[5]) >= 0.9999  # cosine vs golden, vs own fp32
        assert float(row[7]) > 0  # decoder ms
    assert float(fp32[5]) == 1.0 and fp32[6] == "(reference)"
    mean, worst = (float(v) for v in re.match(r"([\d.]+) / ([\d.]+) \(2 slices\)", bf16[6]).groups())
    assert mean >= 0.95 and worst >= 0.9
    assert fp16[1] == "not run: fp16 runs on CUDA only"
    if int8_available():
        assert float(int8[1]) > 0 and int8[3].endswith("%") and float(int8[4]) >= 0.999
        assert re.match(r"[\d.]+ / [\d.]+ \(2 slices\)", int8[6])
    for stage in ("torch import", "checkpoint load", "precision preparation", "first decode", "first encode"):
        assert float(_row(text, stage)[1]) >= 0
    written = (tmp_path / "out" / "bench_cpu.txt").read_text(encoding="utf-8")
    assert written.strip() in text
