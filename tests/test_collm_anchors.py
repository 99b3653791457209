"""The shipped configs reach CoLLM's published test AUC/UAUC on its ML-1M split (within 0.005).

Trains each model for real on the published split (minutes on 2 CPU cores); skipped without the data.
"""

from pathlib import Path

import pytest
from conftest import SHARED_DATA

from minigpt4.config import load_config
from minigpt4.data.collm import import_collm
from minigpt4.data.contract import save_rating_dataset
from minigpt4.training.pretrain import pretrain

# CoLLM paper, Table 2, ML-1M test set: (AUC, UAUC)
PAPER = {"mf": (0.6482, 0.6361), "lightgcn": (0.5959, 0.6499), "sasrec": (0.7078, 0.6884), "din": (0.7166, 0.6459)}
TOLERANCE = 0.005
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_DATA / "collm-ml-1m").is_dir(), reason="published CoLLM data not available"),
]


@pytest.fixture(scope="module")
def collm_ml1m(tmp_path_factory):
    return save_rating_dataset(
        tmp_path_factory.mktemp("collm") / "collm-ml-1m", *import_collm(SHARED_DATA / "collm-ml-1m")
    )


@pytest.mark.parametrize("arch", sorted(PAPER))
def test_reaches_collm_paper_numbers(arch, collm_ml1m, tmp_path):
    config = load_config(
        ROOT / "train_configs" / f"{arch}_collm_ml1m.yaml",
        [f"datasets.path={collm_ml1m}", f"run.output_dir={tmp_path}", "run.cpu=true"],
    )
    metrics = pretrain(config)
    paper_auc, paper_uauc = PAPER[arch]
    assert metrics["test"]["auc"] >= paper_auc - TOLERANCE, metrics["test"]
    assert metrics["test"]["uauc"] >= paper_uauc - TOLERANCE, metrics["test"]
