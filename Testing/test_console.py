"""Issue 24, item 6: library warnings reach the user as one line of ours (highdicom's person-name UserWarning
came as two long lines naming a file in site-packages); developer notices are dropped."""

from __future__ import annotations

import warnings

from highdicom.valuerep import check_person_name

from SAMMed2DSegmentLib import commands
from SAMMed2DSegmentLib.commands import segment as segment_command
from SAMMed2DSegmentLib.console import one_line

LIBRARY_FILE = "/usr/lib/python3/site-packages/somelib/module.py"


def test_library_warnings_are_one_line_each_and_notices_are_dropped(monkeypatch, capsys, tmp_path):
    def noisy_segment(args) -> dict:
        check_person_name("Anonymous")  # highdicom's own warning, as exporting an anonymised series gives
        warnings.warn_explicit("first line\n    second line", UserWarning, LIBRARY_FILE, 3)
        # pydicom logs each of its warnings too (`warn_and_log`): the log line is enough.
        warnings.warn_explicit(
            "Invalid value for VR DS", UserWarning, "/x/site-packages/pydicom/valuerep.py", 1
        )
        warnings.warn("this API is old", DeprecationWarning, stacklevel=1)
        warnings.warn("this API will change", FutureWarning, stacklevel=1)
        return {}

    monkeypatch.setattr(segment_command, "run_segment", noisy_segment)
    argv = ["segment", "--volume", str(tmp_path), "--out", str(tmp_path / "o.seg.nrrd"), "--quiet"]
    assert commands.main(argv) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        'warning: The string "Anonymous" is unlikely to represent the intended person name since it contains '
        "only a single component.",
        "warning: somelib: first line second line",
    ]


def test_warning_settings_come_back_after_the_command(monkeypatch, tmp_path):
    before = (warnings.showwarning, list(warnings.filters))
    monkeypatch.setattr(segment_command, "run_segment", lambda args: {})
    commands.main(["segment", "--volume", str(tmp_path), "--out", str(tmp_path / "o.seg.nrrd"), "--quiet"])
    assert (warnings.showwarning, list(warnings.filters)) == before


def test_one_line_names_the_library_and_keeps_a_long_text_to_its_first_sentence():
    long = "Short first sentence. " + "advice " * 100
    assert (
        one_line(long, "/x/site-packages/highdicom/seg/sop.py") == "warning: highdicom: Short first sentence."
    )
    assert one_line("a\n b", "/x/dist-packages/pydicom-3.0.dist-info/x.py") == "warning: pydicom: a b"
    assert one_line("ours", "/opt/tool/SAMMed2DSegmentLib/commands/segment.py") == "warning: ours"
    assert len(one_line("x" * 1000)) <= len("warning: ") + 200
