"""The HTML report of a DiffRec run: the metrics table, training curves (PNG), the image arms' CLIP and
personalization figures, rows of users with their liked cards and the images each arm drew for them,
and a few LLM replies beside their prompts.

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
from minigpt4.data.images import PersonalHoldout, load_holdout, load_image_table  # noqa: E402

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


def write_report(
    out: Path, rows: list[tuple[str, dict]], metrics: dict, dataset: RatingDataset, image_folder: Path, users: int = 6
) -> Path:
    """``out/report.html`` from the models' metrics rows, the joint run's metrics and its image store."""
    files = out / "report_files"
    shutil.rmtree(files, ignore_errors=True)
    files.mkdir(parents=True)
    plot_curves(metrics["curve"], files / "curves.png")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>DiffRec report</title><style>{STYLE}</style></head><body>",
        "<h1>DiffRec report</h1>",
    ]
    parts.append(
        f"<p>Dataset {html.escape(str(metrics.get('dataset')))}; run folder <code>{html.escape(str(metrics['run_dir']))}</code>.</p>"
    )
    parts.append(
        "<h2>Recommendation</h2><table><tr><th>model</th><th>test AUC</th><th>test UAUC</th><th>warm AUC</th><th>cold AUC</th><th>rows</th></tr>"
    )
    for name, result in rows:
        parts.append(
            f"<tr><td>{html.escape(name)}</td><td>{_number(result['test']['auc'])}</td><td>{_number(result['test']['uauc'])}</td>"
            f"<td>{_number(result['test_warm']['auc'])}</td><td>{_number(result['test_cold']['auc'])}</td><td>{result['test']['n']}</td></tr>"
        )
    parts.append("</table>")
    images = metrics["images"]
    parts.append(
        f"<h2>Personalized images</h2><p>CLIP backbone <b>{html.escape(str(images['backbone']))}</b>. Every arm uses the same seeds.</p>"
    )
    generic = images.get("generic") or {}
    if "missing" in generic:
        parts.append(f"<p>Generic instruction: missing, {html.escape(generic['missing'])}.</p>")
    else:
        parts.append(
            f"<h3>With the generic instruction <i>{html.escape(generic['instruction'])}</i></h3><p>{generic['users']} users whose most recent liked "
            f"items ({generic['held_out_items']} in all) the image training never saw; only the preference can tell what to draw.</p>"
        )
        parts.extend(_arm_table(generic, "held-out liked items"))
    parts.append(f"<h3>With each item's caption</h3><p>{images['pairs']} liked test pairs.</p>")
    parts.extend(_arm_table(images, "liked test items, the drawn item left out"))
    parts.append(
        "<p>Personal similarity: the image against the user's liked items that image training never saw; "
        "margin: minus the same against other users' liked items (0: not personal); identification: is the user the nearest among 10 (chance 0.1), "
        "with a permutation p-value; copy guard: the largest similarity to one liked item the generator saw.</p>"
    )
    parts.append("<h2>Training curves</h2><img src='report_files/curves.png' alt='training curves'>")
    records = [json.loads(line) for line in (image_folder / "records.jsonl").read_text().splitlines()]
    table = load_image_table(dataset.root, dataset.n_items)
    page = _Thumbnails(dataset, table, files)
    holdout = load_holdout(image_folder, dataset, table)
    if holdout is not None:
        parts.append("<h2>Users, generic instruction</h2>")
        parts.extend(_generic_rows(page, holdout, [r for r in records if r["item"] is None], image_folder, users))
    parts.append("<h2>Users, item captions</h2>")
    parts.extend(_pair_rows(page, [r for r in records if r["item"] is not None], image_folder, users))
    replies = images.get("replies") or []
    if replies:
        parts.append("<h2>LLM replies</h2>")
        for reply in replies:
            parts.append(
                f"<p>User {reply['user']} about <b>{html.escape(str(reply['title']))}</b>:</p>"
                f"<details><summary>prompt</summary><div class='reply'>{html.escape(reply['prompt'])}</div></details><div class='reply'>{html.escape(reply['reply'])}</div>"
            )
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _arm_table(results: dict, against: str) -> list[str]:
    """The arms' CLIP and personalization figures as a table, and why any personalization figure is missing."""
    parts = [
        "<table><tr><th>conditioning</th><th>CLIP-T</th><th>CLIP-I</th><th>mean alpha</th><th>personal similarity</th><th>margin</th>"
        "<th>identification Acc@1 (p)</th><th>copy guard</th><th>images</th></tr>"
    ]
    reasons = set()
    for variant, label in ARM_LABELS:
        result = results[variant]
        personal = result.get("personalization") or {}
        reasons.update([personal["missing"]] if "missing" in personal else [])
        identification = (
            f"{_number(personal.get('identification_acc1'), 3)} ({_number(personal.get('identification_p_value'), 3)})"
        )
        guard = personal.get("copy_guard") or {}
        parts.append(
            f"<tr><td>{label}</td><td>{_number(result['clip_t'], 2)}</td><td>{_number(result['clip_i'], 2)}</td><td>{_number(result['alpha'], 3)}</td>"
            f"<td>{_number(personal.get('personal_similarity'), 2)}</td><td>{_number(personal.get('margin'), 2)}</td><td>{identification}</td>"
            f"<td>{_number(guard.get('mean'), 1)}</td><td>{result['images']}</td></tr>"
        )
    parts.append(f"</table><p>Personalization against the {html.escape(against)}.</p>")
    parts.extend(f"<p>Personalization: missing, {html.escape(reason)}.</p>" for reason in sorted(reasons))
    return parts


class _Thumbnails:
    """Item cards and generated images copied beside the page, as <img> tags."""

    def __init__(self, dataset: RatingDataset, images: pd.DataFrame, files: Path) -> None:
        self.dataset, self.files = dataset, files
        self.table = images.set_index("iid")["path"]
        self.titles = dataset.items.set_index("iid")["title"]

    def items(self, iids: list[int], last: int | None = None) -> str:
        """The cards of the (``last``) items that have one, or a note that none has."""
        tags = []
        for iid in [int(iid) for iid in iids if int(iid) in self.table.index][-last if last else None :]:
            name = f"item_{iid}{Path(self.table[iid]).suffix}"
            shutil.copy(self.dataset.root / self.table[iid], self.files / name)
            tags.append(
                f"<img src='report_files/{name}' title='{html.escape(str(self.titles[iid]))}' alt='item {iid}'>"
            )
        return "".join(tags) or "(none with an image)"

    def generated(self, records: list[dict], image_folder: Path) -> str:
        """The arms' images of one row, in arm order, each with its scores."""
        figures = []
        for record in sorted(records, key=lambda r: ARM_ORDER[r["variant"]]):
            shutil.copy(image_folder / record["file"], self.files / record["file"])
            caption = f"{dict(ARM_LABELS)[record['variant']].split(' (')[0]}: CLIP-T {_number(record['clip_t'], 1)}, CLIP-I {_number(record['clip_i'], 1)}, alpha {record['alpha']:.2f}"
            figures.append(
                f"<figure><img src='report_files/{record['file']}' alt='{html.escape(record['instruction'])}'><figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        return "".join(figures)


def _generic_rows(
    page: _Thumbnails, holdout: PersonalHoldout, records: list[dict], image_folder: Path, users: int
) -> list[str]:
    """Per held-out user: the liked cards the generator saw, the held-out ones, and the three arms' images."""
    by_user: dict[int, list[dict]] = {}
    for record in records:
        by_user.setdefault(record["user"], []).append(record)
    histories = {user: list(row.his) for user, row in zip(holdout.users, holdout.rows.itertuples())}
    held = dict(zip(holdout.users, holdout.held_out))
    return [
        f"<div class='user'><div><b>user {user}</b><br>recently liked:<br>{page.items(histories[user], HISTORY_THUMBNAILS)}<br>held out (never trained on):<br>{page.items(held[user])}</div>"
        f"<div class='generated'>for <i>{html.escape(by_user[user][0]['instruction'])}</i><br>{page.generated(by_user[user], image_folder)}</div></div>"
        for user in sorted(by_user)[:users]
    ]


def _pair_rows(page: _Thumbnails, records: list[dict], image_folder: Path, users: int) -> list[str]:
    """One row per (user, liked test item): the user's recent liked items' cards, then the arms' images with their scores."""
    histories = {int(row.uid): list(row.his) for row in page.dataset.splits["test"].itertuples()}
    by_pair: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        by_pair.setdefault((record["user"], record["item"]), []).append(record)
    return [
        f"<div class='user'><div><b>user {user}</b><br>recently liked:<br>{page.items(histories.get(user, []), HISTORY_THUMBNAILS)}</div>"
        f"<div class='generated'>for <i>{html.escape(by_pair[(user, item)][0]['instruction'])}</i><br>{page.generated(by_pair[(user, item)], image_folder)}</div></div>"
        for user, item in sorted(by_pair)[:users]
    ]
