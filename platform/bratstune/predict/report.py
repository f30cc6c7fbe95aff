"""What batch prediction reports per case and per cohort: region statistics, QC thumbnails, HTML.

* region volumes (mL) and lesion counts per case come from
  :func:`bratstune.metrics.volumes.region_stats`;
* :func:`save_thumbnail`: one PNG per case, three orthogonal FLAIR slices through the tumour
  centre with the labels overlaid (legend = scheme labels);
* :func:`save_summary_plot`: cohort summary (region volumes and lesion counts per region, one point
  per case, drift- or plausibility-flagged cases in red);
* :func:`write_report`: ``report.html`` (cohort counts, cohort-level flags, summary plot, failures,
  one row and one card per case with its drift and plausibility flags);
* :func:`add_reference_scores`: when reference labels exist for the cohort (a synthetic cohort, a
  labelled audit set), the scores they give go into the same report, never into the predictor.

Matplotlib is used through its object API with the Agg canvas (no global backend change).
"""

from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bratstune.inference.outputs import label_values, labels_to_classes

logger = logging.getLogger(__name__)

__all__ = ["add_reference_scores", "save_summary_plot", "save_thumbnail", "write_report"]

PALETTE = ("#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3", "#ffff33")


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    if labels.any():
        return tuple(int(round(float(c))) for c in np.argwhere(labels > 0).mean(axis=0))  # type: ignore[return-value]
    return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]


def save_thumbnail(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    scheme: Any,
    *,
    title: str,
    channel: int = -1,
    flagged: bool = False,
) -> Path:
    """Axial, coronal and sagittal slices of ``image[channel]`` through the tumour centre, labels overlaid.

    Args:
        path: output PNG.
        image: raw ``(C, X, Y, Z)`` volume (default channel: the last, FLAIR in ``MODALITIES`` order).
        labels: uint8 ``(X, Y, Z)`` in ``scheme``.
        title: figure title (case id, volumes).
        flagged: draw the title in red (drift flags).
    """
    # Deferred: matplotlib is heavy; only runs with thumbnails draw.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.colors import ListedColormap  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    values = label_values(scheme)
    cmap = ListedColormap(list(PALETTE[: max(1, len(values))]))
    volume = np.asarray(image)[channel]
    brain = volume[volume != 0]
    vmax = float(np.percentile(brain, 99.5)) if brain.size else 1.0
    x, y, z = _centre(labels)
    planes = (
        ("axial", volume[:, :, z], labels[:, :, z]),
        ("coronal", volume[:, y, :], labels[:, y, :]),
        ("sagittal", volume[x, :, :], labels[x, :, :]),
    )
    fig = Figure(figsize=(7.5, 2.9), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (name, background, seg) in zip(axes, planes):
        ax.imshow(background.T, cmap="gray", origin="lower", vmin=0, vmax=vmax or None)
        classes = labels_to_classes(seg, scheme).T.astype(float)
        if classes.any():
            ax.imshow(
                np.ma.masked_equal(classes, 0) - 1,
                cmap=cmap,
                vmin=0,
                vmax=max(1, len(values) - 1),
                alpha=0.55,
                origin="lower",
                interpolation="nearest",
            )
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8, color="#c00000" if flagged else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def save_summary_plot(path: Path, rows: Sequence[Mapping[str, Any]], scheme: Any) -> Path | None:
    """Region volumes and lesion counts across the cohort (one point per case, red = drift or plausibility flag)."""
    # Deferred: matplotlib is heavy; see save_thumbnail.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    if not rows:
        return None
    regions = list(scheme.regions)
    fig = Figure(figsize=(10, 3.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2, 2, 1.4]})
    rng = np.random.default_rng(0)
    flagged = np.asarray([bool(r.get("drift") or r.get("plausibility")) for r in rows])
    for ax, key, label in ((axes[0], "volume_{}_ml", "volume (mL)"), (axes[1], "lesions_{}", "lesions")):
        data = [np.asarray([float(r.get(key.format(g), 0) or 0) for r in rows]) for g in regions]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(regions) + 1), regions)
        for i, values in enumerate(data, start=1):
            jitter = i + rng.uniform(-0.15, 0.15, size=values.size)
            ax.scatter(jitter[~flagged], values[~flagged], s=12, color="#377eb8", zorder=3)
            ax.scatter(jitter[flagged], values[flagged], s=18, color="#e41a1c", zorder=4)
        ax.set_ylabel(label)
        ax.set_title(f"{label} per region ({len(rows)} cases)", fontsize=9)
    stages = ("load_s", "preprocess_s", "network_s", "postprocess_s", "write_s")
    means = [float(np.mean([float(r.get(s, 0) or 0) for r in rows])) for s in stages]
    left = 0.0
    for stage, value, color in zip(stages, means, PALETTE):
        axes[2].barh([0], [value], left=left, color=color, label=stage[:-2])
        left += value
    axes[2].set_yticks([])
    axes[2].set_xlabel("seconds per case (mean)")
    axes[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    axes[2].set_title("time split", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return html.escape(str(value))


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f0f0f0}"
    ".cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px;width:610px}"
    "td:first-child{white-space:nowrap}.card img{width:600px}.flag{color:#c00000;font-weight:bold}.ok{color:#2a7d2a}"
    ".fail td{text-align:left}"
)


def _counts_table(counts: Mapping[str, int]) -> str:
    return (
        "<table><tr>"
        + "".join(f"<th>{html.escape(k)}</th>" for k in counts)
        + "</tr><tr>"
        + "".join(f"<td>{v}</td>" for v in counts.values())
        + "</tr></table>"
    )


def _failures_table(failures: Sequence[Mapping[str, Any]]) -> list[str]:
    if not failures:
        return []
    return [
        "<h2>Failures</h2><table class='fail'><tr><th>case</th><th>reason</th></tr>",
        *(
            f"<tr><td>{html.escape(str(f['case_id']))}</td><td>{html.escape(str(f['reason']))}</td></tr>"
            for f in failures
        ),
        "</table>",
    ]


def _flag_cell(text: str) -> str:
    return f"<td class='flag' style='text-align:left'>{html.escape(text)}</td>" if text else "<td class='ok'>ok</td>"


def _case_row(r: Mapping[str, Any], regions: Sequence[str]) -> str:
    case_id = html.escape(str(r["case_id"]))
    cells = "".join(
        f"<td>{_cell(r.get(f'volume_{g}_ml', ''))}</td><td>{_cell(r.get(f'lesions_{g}', ''))}</td>" for g in regions
    )
    return (
        f"<tr><td style='text-align:left'><a href='#{case_id}'>{case_id}</a></td>{cells}"
        f"<td>{_cell(r.get('seconds', ''))}</td>{_flag_cell(r.get('plausibility') or '')}"
        f"{_flag_cell(r.get('drift') or '')}</tr>"
    )


def _case_card(r: Mapping[str, Any]) -> str:
    thumb = r.get("thumbnail")
    case_id = html.escape(str(r["case_id"]))
    img = f"<img src='{html.escape(str(thumb))}' alt='{case_id}'>" if thumb else ""
    flags = "".join(
        f"<div class='flag'>{kind}: {html.escape(str(r.get(key)))}</div>"
        for key, kind in (("plausibility", "implausible"), ("drift", "drift"))
        if r.get(key)
    )
    return f"<div class='card' id='{case_id}'><b>{case_id}</b>{img}{flags}</div>"


def _cohort_flags(flags: Sequence[str]) -> list[str]:
    if not flags:
        return []
    items = "".join(f"<li class='flag'>{html.escape(f)}</li>" for f in flags)
    return [f"<h2>Cohort flags</h2><p>Compared with the model's out-of-fold predictions:</p><ul>{items}</ul>"]


def write_report(
    path: Path,
    *,
    rows: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]],
    scheme: Any,
    model: str,
    summary_png: Path | None,
    counts: Mapping[str, int],
    cohort_flags: Sequence[str] = (),
) -> Path:
    """Write ``report.html`` (relative links to ``qc/*.png`` next to it).

    ``cohort_flags`` (:func:`bratstune.predict.plausibility.cohort_flags`) get their own section;
    each case row shows its plausibility and drift flags ("ok" when none).
    """
    path = Path(path)
    regions = list(scheme.regions)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>bratstune batch prediction</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Batch prediction report</h1><p>model <b>{html.escape(model)}</b> &middot; scheme "
        f"{html.escape(scheme.name)} &middot; {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        _counts_table(counts),
        *_cohort_flags(cohort_flags),
    ]
    if summary_png is not None:
        parts.append(
            f"<h2>Cohort summary</h2><img src='{html.escape(os.path.relpath(summary_png, path.parent))}' "
            "alt='cohort summary'>"
        )
    parts.extend(_failures_table(failures))
    parts.append(
        f"<h2>Cases ({len(rows)})</h2><table><tr><th>case</th>"
        + "".join(f"<th>{r} mL</th><th>{r} lesions</th>" for r in regions)
        + "<th>seconds</th><th>plausibility</th><th>drift</th></tr>"
    )
    parts.extend(_case_row(r, regions) for r in rows)
    parts.append("</table><h2>QC thumbnails</h2><div class='cards'>")
    parts.extend(_case_card(r) for r in rows)
    parts.append("</div></body></html>")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
    return path


_SCORES_START, _SCORES_END = "<!-- reference-scores -->", "<!-- /reference-scores -->"
_SCORE_COLUMNS = (
    ("lesionwise_dice", "lesion-wise Dice"),
    ("lesionwise_hd95", "lesion-wise HD95 (mm)"),
    ("legacy_dice", "Dice"),
    ("num_tp", "TP lesions"),
    ("num_fp", "FP lesions"),
    ("num_fn", "FN lesions"),
)


def add_reference_scores(path: Path, summary: Mapping[str, Mapping[str, float]], *, source: str) -> Path:
    """Put the cohort's scores against reference labels into ``report.html`` (replacing earlier ones).

    Args:
        path: the ``report.html`` of a batch prediction.
        summary: region -> metric -> mean over cases (``bratstune evaluate --json``'s ``summary``).
        source: what the scores were computed against (shown in the report).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if _SCORES_START in text:
        head, rest = text.split(_SCORES_START, 1)
        text = head + rest.split(_SCORES_END, 1)[1]
    rows = "".join(
        f"<tr><td>{html.escape(region)}</td>"
        + "".join(f"<td>{_cell(metrics.get(key, '-'))}</td>" for key, _ in _SCORE_COLUMNS)
        + "</tr>"
        for region, metrics in summary.items()
    )
    section = (
        f"{_SCORES_START}<h2>Scores against reference labels</h2><p>{html.escape(source)}; used for this "
        "report only, never by the predictor. Means over cases (brats2023 lesion-wise rules).</p>"
        "<table><tr><th>region</th>" + "".join(f"<th>{label}</th>" for _, label in _SCORE_COLUMNS) + "</tr>"
        f"{rows}</table>{_SCORES_END}"
    )
    anchor = text.find("<h2>Cases")
    text = text[:anchor] + section + text[anchor:] if anchor >= 0 else text.replace("</body>", section + "</body>")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
