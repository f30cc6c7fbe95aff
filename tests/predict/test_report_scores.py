"""Reference scores in the QC report: added once, replaced on a second evaluation, nothing else touched."""

from __future__ import annotations

from bratstune.predict.report import add_reference_scores


def test_reference_scores_go_into_the_report_once_and_are_replaced(tmp_path):
    report = tmp_path / "report.html"
    report.write_text("<html><body><h1>Batch</h1><h2>Cases (1)</h2><table></table></body></html>")
    first = {"WT": {"lesionwise_dice": 0.812, "lesionwise_hd95": 7.5, "num_fp": 0.0}, "ET": {"lesionwise_dice": 0.5}}
    add_reference_scores(report, first, source="the synthetic labels of new-GLI-cohort")
    text = report.read_text()
    assert text.index("Scores against reference labels") < text.index("<h2>Cases")
    assert "0.812" in text and "new-GLI-cohort" in text and "<td>-</td>" in text  # ET has no HD95: shown as -

    add_reference_scores(report, {"WT": {"lesionwise_dice": 0.9}}, source="labels")
    text = report.read_text()
    assert text.count("Scores against reference labels") == 1 and "0.812" not in text and "0.9" in text
    assert text.startswith("<html><body><h1>Batch</h1>") and text.endswith("</table></body></html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temp file left
