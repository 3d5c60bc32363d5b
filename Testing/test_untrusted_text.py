"""Untrusted text (README "What is guaranteed"): a C locale, names that would break out of the
report's data block, colours edited into a summary, and file names with line breaks or control characters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import one_line_error, run_cli

# -- 11, 12. a C locale, and hostile names in the report --------------------------------------------

HOSTILE_NAME = "<!--<script>α"


def report_data_block(html: str) -> str:
    start = html.index('<script type="application/json" id="report-data">') + len('<script type="application/json" id="report-data">')
    return html[start: html.index("</script>", start)]


def test_c_locale_run_with_report_and_hostile_names(tmp_path, volume, model_factory):
    from entropymerge.modelcard import default_labels

    labels = default_labels(["background", "βeta", "τau"])
    first = model_factory("hostile", seed=1, labels=labels)  # file names stay ASCII: a C locale cannot name others
    second = model_factory("other", seed=2, labels=labels, site="site τ")
    card = json.loads(first.read_text(encoding="utf-8"))
    first.write_text(json.dumps(dict(card, name=HOSTILE_NAME), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    environment = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONIOENCODING="")
    result = subprocess.run([sys.executable, "-m", "entropymerge", "run", "--volume", str(volume), "--model", str(first),
                             "--model", str(second), "--method", "mean", "--per-model", "--report", "--out", str(out),
                             "--progress", "none"], capture_output=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    html = (out / "report.html").read_bytes().decode("utf-8")
    block = report_data_block(html)
    assert not any(marker in block for marker in ("<", ">", "&")), "the data block cannot end early or start a comment"
    data = json.loads(block)
    assert [layer["title"] for layer in data["layers"]][1:] == [HOSTILE_NAME, "other"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [label["name"] for label in summary["labels"]] == ["background", "βeta", "τau"]


def test_a_colour_edited_into_the_summary_is_refused(tmp_path, volume, model_factory):
    out = tmp_path / "out"
    assert run_cli("run", "--volume", volume, "--model", model_factory("a"), "--out", out, "--progress", "none").returncode == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    summary["labels"][1]["color"] = "red;}</style><script>alert(1)</script>"
    (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    result = run_cli("report", out)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {out / 'summary.json'}: the label {summary['labels'][1]!r} needs a colour written '#rrggbb'"]
    assert not (out / "report.html").exists()


# -- 9. early and quiet failures ---------------------------------------------------------------------

def test_names_with_line_breaks_and_control_characters_print_on_one_line(tmp_path, volume):
    odd = tmp_path / "line\nbreak\x1b[31m.nii.gz"
    line = one_line_error(run_cli("run", "--volume", odd, "--model", tmp_path / "m.json", "--out", tmp_path / "out"))
    assert line == f"error: volume not found: {tmp_path}/line break\\x1b[31m.nii.gz"
