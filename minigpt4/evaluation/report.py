"""The HTML report of a DiffRec run: the metrics table, training curves (PNG), a grid of users with their
history thumbnails, their generated images and CLIP scores, and a few LLM replies.

Everything the page shows sits beside it (``report_files/``), so the folder can be copied or served as is.
A missing figure is printed as "missing", never as a number.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from minigpt4.data.contract import RatingDataset  # noqa: E402
from minigpt4.data.images import load_image_table  # noqa: E402

HISTORY_THUMBNAILS = 5
ARM_LABELS = (
    ("fused", "instruction + preference (adaptive fusion)"),
    ("alpha0", "instruction only (alpha forced to 0)"),
    ("shuffled", "instruction + another user's preference"),
)
ARM_ORDER = {variant: rank for rank, (variant, _) in enumerate(ARM_LABELS)}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.user { border-top: 1px solid #ddd; padding: 0.8em 0; display: flex; gap: 2em; align-items: flex-start; }
.user img { width: 64px; height: 64px; image-rendering: pixelated; border: 1px solid #aaa; margin-right: 3px; }
.generated img { width: 128px; height: 128px; }
figure { display: inline-block; margin: 0 6px 0 0; text-align: center; font-size: 12px; }
.reply { background: #f5f5f5; padding: 0.6em; margin: 0.5em 0; white-space: pre-wrap; }
"""


def _number(value: float | None, digits: int = 4) -> str:
    """A figure for the page, or 'missing'."""
    return "missing" if value is None else f"{value:.{digits}f}"


def plot_curves(curve: list[dict], path: Path) -> Path:
    """Recommendation and image losses and valid AUC against the optimizer step."""
    frame = pd.DataFrame(curve)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for column, label in (("rec_loss", "recommendation (BCE)"), ("image_loss", "images (flow matching)")):
        if column in frame:
            axes[0].plot(frame["step"], frame[column], marker="o", label=label)
    axes[0].set(xlabel="step", ylabel="training loss", title="losses")
    axes[0].legend()
    axes[1].plot(frame["step"], frame["valid_auc"], marker="o", color="tab:green")
    axes[1].set(xlabel="step", ylabel="AUC", title="valid AUC")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(out: Path, rows: list[tuple[str, dict]], metrics: dict, dataset: RatingDataset, image_folder: Path, users: int = 6) -> Path:
    """``out/report.html`` from the models' metrics rows, the joint run's metrics and its image store."""
    files = out / "report_files"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    plot_curves(metrics["curve"], files / "curves.png")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>DiffRec report</title><style>{STYLE}</style></head><body>", "<h1>DiffRec report</h1>"]
    parts.append(f"<p>Dataset {html.escape(str(metrics.get('dataset')))}; run folder <code>{html.escape(str(metrics['run_dir']))}</code>.</p>")
    parts.append("<h2>Recommendation</h2><table><tr><th>model</th><th>test AUC</th><th>test UAUC</th><th>warm AUC</th><th>cold AUC</th><th>rows</th></tr>")
    for name, result in rows:
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{_number(result['test']['auc'])}</td><td>{_number(result['test']['uauc'])}</td>"
            f"<td>{_number(result['test_warm']['auc'])}</td><td>{_number(result['test_cold']['auc'])}</td><td>{result['test']['n']}</td></tr>"
        )
    parts.append("</table>")
    images = metrics["images"]
    parts.append(f"<h2>Personalized images</h2><p>{images['pairs']} liked test pairs; CLIP backbone <b>{html.escape(str(images['backbone']))}</b>.</p>")
    parts.append(
        "<table><tr><th>conditioning</th><th>CLIP-T</th><th>CLIP-I</th><th>mean alpha</th><th>personal similarity</th><th>margin</th>"
        "<th>identification Acc@1 (p)</th><th>copy guard</th><th>images</th></tr>"
    )
    reasons = set()
    for variant, label in ARM_LABELS:
        result = images[variant]
        personal = result.get("personalization") or {}
        reasons.update([personal["missing"]] if "missing" in personal else [])
        identification = f"{_number(personal.get('identification_acc1'), 3)} ({_number(personal.get('identification_p_value'), 3)})"
        guard = personal.get("copy_guard") or {}
        parts.append(
            f"<tr><td>{label}</td><td>{_number(result['clip_t'], 2)}</td><td>{_number(result['clip_i'], 2)}</td><td>{_number(result['alpha'], 3)}</td>"
            f"<td>{_number(personal.get('personal_similarity'), 2)}</td><td>{_number(personal.get('margin'), 2)}</td><td>{identification}</td>"
            f"<td>{_number(guard.get('mean'), 1)}</td><td>{result['images']}</td></tr>"
        )
    parts.append("</table>")
    parts.extend(f"<p>Personalization: missing, {html.escape(reason)}.</p>" for reason in sorted(reasons))
    parts.append(
        "<p>Personal similarity: the image against the user's liked test items (never in image training; the item it was drawn for left out); "
        "margin: minus the same against other users' liked items; identification: is the user the nearest among 10 (chance 0.1); "
        "copy guard: the largest similarity to one history item.</p>"
    )
    parts.append("<h2>Training curves</h2><img src='report_files/curves.png' alt='training curves'>")
    parts.append("<h2>Users</h2>")
    parts.extend(_user_rows(dataset, image_folder, files, users))
    replies = images.get("replies") or []
    if replies:
        parts.append("<h2>LLM replies</h2>")
        for reply in replies:
            parts.append(f"<p>User {reply['user']} about <b>{html.escape(str(reply['title']))}</b>:</p><div class='reply'>{html.escape(reply['reply'])}</div>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _user_rows(dataset: RatingDataset, image_folder: Path, files: Path, users: int) -> list[str]:
    """One row per (user, liked test item): the user's recent liked items' cards, then the generated images with their scores."""
    records = [json.loads(line) for line in (image_folder / "records.jsonl").read_text().splitlines()]
    table = load_image_table(dataset.root, dataset.n_items).set_index("iid")["path"]
    titles = dataset.items.set_index("iid")["title"]
    histories = {int(row.uid): list(row.his) for row in dataset.splits["test"].itertuples()}
    by_pair: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        by_pair.setdefault((record["user"], record["item"]), []).append(record)
    parts = []
    for user, item in sorted(by_pair)[:users]:
        liked = [int(iid) for iid in histories.get(user, []) if int(iid) in table.index][-HISTORY_THUMBNAILS:]
        history_html = []
        for iid in liked:
            name = f"history_{user}_{iid}{Path(table[iid]).suffix}"
            shutil.copy(dataset.root / table[iid], files / name)
            history_html.append(f"<img src='report_files/{name}' title='{html.escape(str(titles[iid]))}' alt='item {iid}'>")
        generated_html = []
        for record in sorted(by_pair[(user, item)], key=lambda r: ARM_ORDER[r["variant"]]):
            shutil.copy(image_folder / record["file"], files / record["file"])
            caption = f"{record['variant']}: CLIP-T {_number(record['clip_t'], 1)}, CLIP-I {_number(record['clip_i'], 1)}, alpha {record['alpha']:.2f}"
            generated_html.append(f"<figure><img src='report_files/{record['file']}' alt='{html.escape(record['instruction'])}'><figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append(
            f"<div class='user'><div><b>user {user}</b><br>recently liked:<br>{''.join(history_html) or '(none with an image)'}</div>"
            f"<div class='generated'>for <i>{html.escape(by_pair[(user, item)][0]['instruction'])}</i><br>{''.join(generated_html)}</div></div>"
        )
    return parts
