"""The demo's last screen: the short summary, built from a real joint run's figures, rounded and narrow, ending
with where the report and the full figures are and how to use the run."""

import json
import re
from pathlib import Path

from minigpt4.data.contract import load_rating_dataset
from minigpt4.demo import demo_summary
from minigpt4.evaluation.ctr import frame_metrics
from minigpt4.io import json_safe
from minigpt4.recommenders import load_recommender


def test_summary_is_short_rounded_and_ends_with_the_way_on(trained_joint, card_dataset, mf_checkpoint, tmp_path):
    """Every figure at most 4 decimals, no line over 200 characters, no raw dict; report, figures file, commands last."""
    joint = trained_joint["metrics"]
    mf = frame_metrics(load_recommender(mf_checkpoint), load_rating_dataset(card_dataset).splits["test"])
    results = json_safe(
        {
            "seconds": {"prepare_data": 4.43, "train_mf": 2.61, "train_joint": 252.2, "report": 1.7},
            "train_joint": joint,
            "report": {"report": str(tmp_path / "report.html"), "mf_on_the_same_rows": mf},
        }
    )
    figures = tmp_path / "results.json"
    lines = demo_summary(results, figures, ["run.max_steps=8"]).splitlines()
    assert all(len(line) <= 200 for line in lines), max(lines, key=len)
    text = "\n".join(lines)
    assert not re.search(r"\d\.\d{5,}", text), "a figure is printed unrounded"
    assert "{" not in text and "'auc'" not in text, "a raw dict is printed"
    assert f"{joint['test']['auc']:.4f}" in text and f"{mf['test']['auc']:.4f}" in text
    for arm in ("fused", "alpha0", "shuffled"):
        assert any(line.strip().startswith(arm) for line in lines), f"the {arm} arm is missing"
    assert "total 261" in text
    assert lines[-4] == f"report:  {tmp_path / 'report.html'}" and lines[-3] == f"figures: {figures}"
    assert (
        lines[-2].startswith("use the run: .venv/bin/diffrec app --cfg-path")
        and "--options run.max_steps=8" in lines[-2]
    )
    assert lines[-1].strip().startswith("or: .venv/bin/diffrec recommend")
    json.dumps(results)  # what the demo writes to results.json
    assert Path(lines[-4].split()[-1]).name == "report.html"
