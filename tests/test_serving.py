"""Serving a trained run: the Python API (two-stage recommend, replies, images, new users folded in), the
``diffrec recommend`` command, the app's handlers, every bad input as one message, and the page driven in
a real headless browser."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_config
from scipy.stats import spearmanr

from minigpt4.app import DATASET_USER, NEW_USER, DiffRecApp, default_sizes, launch
from minigpt4.cli import main
from minigpt4.config import load_config
from minigpt4.errors import DiffRecError
from minigpt4.recommenders import load_recommender
from minigpt4.recommenders.fold_in import GuestUser, fold_in_user
from minigpt4.serving import MAX_INSTRUCTION_CHARS, DiffRec, UserProfile
from minigpt4.training.pretrain import pretrain


@pytest.fixture(scope="module")
def served(trained_joint) -> DiffRec:
    """The tiny joint run, loaded from its config file (the latest run's checkpoint)."""
    return DiffRec.load(trained_joint["path"])


def test_load_finds_the_same_checkpoint_from_config_run_folder_and_checkpoint(served, trained_joint):
    run_dir = Path(trained_joint["metrics"]["run_dir"])
    assert served.checkpoint == Path(trained_joint["metrics"]["checkpoint"])
    for source in (run_dir, run_dir.parent, served.checkpoint):
        assert DiffRec.load(source).checkpoint == served.checkpoint


def test_recommend_ranks_unseen_collaborative_candidates_by_the_llm_score(served):
    profile = served.user(3)
    ranking = served.recommend(3, k=5, candidates=8)
    assert len(ranking) == 5
    assert not {entry.item for entry in ranking} & profile.seen
    llm = [entry.llm_score for entry in ranking]
    assert llm == sorted(llm, reverse=True)
    assert all(np.isfinite(entry.collab_score) and np.isfinite(entry.llm_score) for entry in ranking)
    # The candidates are the collaborative model's top 8 unseen items, and the scores are the stages' own.
    scores = served.collab_scores(3)
    scores[torch.as_tensor(sorted(profile.seen)) - 1] = -torch.inf
    top = set((torch.topk(scores, 8).indices + 1).tolist())
    assert {entry.item for entry in ranking} <= top and all(1 <= entry.collab_rank <= 8 for entry in ranking)
    items = [entry.item for entry in ranking]
    assert torch.allclose(served.llm_scores(3, items), torch.tensor(llm), atol=1e-4)
    assert torch.allclose(scores[torch.as_tensor(items) - 1], torch.tensor([entry.collab_score for entry in ranking]))


def test_blend_orders_by_the_mean_of_both_ranks(served):
    blended = served.recommend(3, k=8, candidates=8, rerank="blend")
    by_llm = sorted(blended, key=lambda entry: -entry.llm_score)
    llm_rank = {entry.item: rank for rank, entry in enumerate(by_llm)}
    mean_ranks = [llm_rank[entry.item] + entry.collab_rank for entry in blended]
    assert mean_ranks == sorted(mean_ranks) and {entry.item for entry in blended} == {
        entry.item for entry in served.recommend(3, k=8, candidates=8)
    }


def test_replies_and_images_are_deterministic_per_seed(served):
    first_reply = served.reply(3, 2, seed=5)
    torch.rand(7)  # a draw in between: the reply depends on its seed, not on the global random state
    assert served.reply(3, 2, seed=5) == first_reply != served.reply(3, 2, seed=6)
    first, again, other = served.image(3, 2, seed=11), served.image(3, 2, seed=11), served.image(3, 2, seed=12)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    assert first.instruction == f"a poster for {served.title(2)}" and not first.alpha_forced
    forced = served.image(3, instruction="a quiet poster", alpha=0.0, seed=11)
    assert forced.alpha == 0.0 and forced.alpha_forced and forced.instruction == "a quiet poster"
    with_items = served.recommend(3, k=2, candidates=4, replies=True, images=True, seed=5)
    assert all(entry.reply is not None and entry.image is not None for entry in with_items)
    assert with_items[0].reply == served.reply(3, with_items[0].item, seed=5)


def test_a_new_user_is_folded_in_and_served(served):
    liked = served.user(3).liked
    ranking = served.recommend(liked, k=3, candidates=6, replies=True)
    assert len(ranking) == 3 and not {entry.item for entry in ranking} & set(liked)
    profile = served.new_user(liked)
    assert profile.uid == 0 and profile.folded_in
    # The folded-in vector reaches the LLM (CoRA reads the collaborative user vector): the same likes (so the same
    # prompts) with another user's folded-in vector score differently.
    other_vector = served.new_user([item for item in range(1, 31) if item not in liked][:3]).vector
    assert not torch.allclose(profile.vector, other_vector)
    swapped = UserProfile(0, profile.liked, profile.seen, other_vector)
    items = [entry.item for entry in ranking]
    assert not torch.allclose(served.llm_scores(profile, items), served.llm_scores(swapped, items))
    assert not torch.allclose(served.collab_scores(profile), served.collab_scores(swapped))


def test_a_cold_dataset_user_is_served_from_the_folded_in_vector(served, monkeypatch):
    """A dataset user the collaborative model never trained on (every tiny-dataset user trained, so user 3 is
    declared untrained) is folded in by ``user()`` from their likes and reads that vector everywhere, exactly as a
    new user with the same likes does."""
    trained = served.user(3)
    assert not trained.folded_in
    monkeypatch.setattr(served, "_trained_users", served._trained_users - {3})
    cold = served.user(3)
    assert cold.folded_in and cold.uid == 3 and cold.liked == trained.liked
    newcomer = served.new_user(cold.liked)
    assert torch.equal(cold.vector, newcomer.vector)
    assert torch.equal(served.collab_scores(cold), served.collab_scores(newcomer))
    assert not torch.equal(served.collab_scores(cold), served.collab_scores(trained))
    items = list(range(1, 9))
    assert torch.equal(served.llm_scores(cold, items), served.llm_scores(newcomer, items))
    assert not torch.equal(served.llm_scores(cold, items), served.llm_scores(trained, items))


def test_mf_fold_in_of_a_users_likes_ranks_like_that_user(tiny_dataset, tmp_path):
    """An MF that learned the tiny dataset's 2-d tastes (from likes and dislikes): the vector folded in from a
    user's liked items alone ranks the catalogue like the user's trained vector, far more than like other
    users' or the average user's."""
    from minigpt4.data.contract import load_rating_dataset

    config = write_config(
        tmp_path, tiny_dataset, "mf", model={"embedding_size": 4}, run={"max_epochs": 60, "lr": 0.05, "patience": 60}
    )
    model = load_recommender(pretrain(load_config(config))["checkpoint"])
    users, items = (table.detach() for table in model.ranking_tables())
    train = load_rating_dataset(tiny_dataset).splits["train"]
    own, others, average = [], [], []
    for uid, rows in train[train["label"] == 1].groupby("uid"):
        folded = items @ fold_in_user(model, rows["iid"].tolist())
        correlations = np.array([spearmanr(folded, items @ users[row])[0] for row in range(len(users))])
        own.append(correlations[uid - 1])
        others.append(np.delete(correlations, uid - 1).mean())
        average.append(spearmanr(items @ users[uid - 1], items @ users.mean(0))[0])
    own, others, average = np.mean(own), np.mean(others), np.mean(average)
    assert own > 0.7 and own > others + 0.4 and own > average + 0.3, (own, others, average)


def test_guest_user_reads_the_vector_only_for_user_zero(mf_checkpoint):
    from minigpt4.data.tensors import RatingBatch

    model = load_recommender(mf_checkpoint)
    guest = GuestUser(model)
    uid, iid = torch.tensor([0, 4]), torch.tensor([3, 3])
    batch = RatingBatch(
        rows=torch.arange(2), uid=uid, iid=iid, label=torch.zeros(2), his=torch.zeros(2, 1, dtype=torch.long)
    )
    assert torch.equal(guest.score(batch), model.score(batch))  # no vector set: the model as it is
    assert torch.equal(guest.user_embeddings(batch), model.user_embeddings(batch))
    guest.vector = torch.ones(8)
    scores = guest.score(batch)
    assert scores[0] == model.item_embedding.weight[3].sum() and scores[1] == model.score(batch)[1]
    users = guest.user_embeddings(batch)  # what CoRA and the image fusion read
    assert torch.equal(users[0], torch.ones(8)) and torch.equal(users[1], model.user_embeddings(batch)[1])
    assert torch.equal(guest.item_embeddings(iid), model.item_embeddings(iid))
    assert torch.equal(guest.ranking_tables()[1], model.ranking_tables()[1])
    assert guest.max_history == model.max_history == 0 and guest.padding_invariant == model.padding_invariant
    assert (guest.n_users, guest.n_items) == (model.n_users, model.n_items)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.recommend(0), "unknown user 0"),
        (lambda s: s.recommend(10_000), "unknown user 10000"),
        (lambda s: s.recommend("3"), "a user is a user id or a list of liked item ids"),
        (lambda s: s.recommend([]), "at least one liked item"),
        (lambda s: s.recommend([1, 999]), "999 is not an item id"),
        (lambda s: s.recommend(3, k=0), "k must be an integer in 1.."),
        (lambda s: s.recommend(3, k=500), "k must be an integer in 1.."),
        (lambda s: s.recommend(3, k=5, candidates=3), r"candidates \(3\) must be at least k \(5\)"),
        (lambda s: s.recommend(3, k=2, candidates=4, rerank="random"), "rerank must be one of llm, blend"),
        (lambda s: s.reply(3, 0), "0 is not an item id"),
        (lambda s: s.image(3, instruction="   "), "the instruction is empty"),
        (lambda s: s.image(3, instruction="x" * (MAX_INSTRUCTION_CHARS + 1)), "characters; at most"),
        (lambda s: s.image(3, alpha=1.5), "alpha must be a number in 0..1"),
        (lambda s: s.image(3, seed=-1), "seed must be a non-negative integer"),
    ],
)
def test_bad_requests_are_one_clear_error(served, call, message):
    with pytest.raises(DiffRecError, match=message):
        call(served)


def test_a_run_missing_a_part_is_an_error_naming_it(trained_joint, tmp_path):
    run_dir = Path(trained_joint["metrics"]["run_dir"])
    with pytest.raises(DiffRecError, match="not found"):
        DiffRec.load(tmp_path / "nowhere")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished, ignore=shutil.ignore_patterns("metrics.json"))
    with pytest.raises(DiffRecError, match="metrics.json: missing; the run has not finished"):
        DiffRec.load(unfinished)
    checkpoint = tmp_path / "run" / "checkpoints" / "last"
    shutil.copytree(Path(trained_joint["metrics"]["checkpoint"]), checkpoint)
    shutil.copy(run_dir / "config.yaml", tmp_path / "run" / "config.yaml")
    (checkpoint / "image" / "fusion.safetensors").unlink()
    with pytest.raises(DiffRecError, match="fusion.safetensors"):
        DiffRec.load(checkpoint)


def test_recommend_command_prints_json_lines_and_writes_images(trained_joint, tmp_path, capsys):
    config = str(trained_joint["path"])
    assert main(["recommend", "--cfg-path", config, "--user", "3", "--k", "3", "--candidates", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["rank"] for line in lines] == [1, 2, 3] and all(
        {"item", "title", "collab_score", "llm_score"} <= set(line) for line in lines
    )
    images = tmp_path / "pictures"
    assert (
        main(
            [
                "recommend",
                "--cfg-path",
                config,
                "--liked",
                "1,5,9",
                "--k",
                "2",
                "--candidates",
                "4",
                "--replies",
                "--images",
                str(images),
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(Path(line["image_file"]).is_file() and "reply" in line for line in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "999"], "unknown user 999"),
        (["--liked", "1,x"], "expected item ids separated by commas"),
        (["--liked", "1,5000"], "5000 is not an item id"),
        (["--user", "3", "--k", "0"], "k must be an integer"),
        (["--user", "3", "--user", "4", "--liked", "1"], "not allowed with argument"),
    ],
)
def test_recommend_command_bad_input_is_one_line_exit_2(trained_joint, tmp_path, capsys, args, message):
    images = tmp_path / "never"
    try:
        code = main(["recommend", "--cfg-path", str(trained_joint["path"]), "--images", str(images), *args])
    except SystemExit as usage:  # argparse's usage errors exit from the parser
        code = usage.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not images.exists()  # nothing half-written


def test_app_handlers_show_results_and_messages(served):
    app = DiffRecApp(served)
    status, gallery, table, replies, item, picture, caption = app.recommend(DATASET_USER, 3, None, 3, 5, True)
    assert status.startswith("**Top 3 of 5") and len(table) == 3 and list(table["rank"]) == [1, 2, 3]
    assert (
        gallery
        and replies.count("**") == 6
        and item == table["item"].iloc[0]
        and picture is not None
        and "learned alpha" in caption
    )
    status, *_ = app.recommend(NEW_USER, None, [1, 5], 2, 4, False)
    assert status.startswith("**Top 2 of 4") and "new user" in status
    for args, message in (
        ((DATASET_USER, 999, None, 3, 5, False), "unknown user 999"),
        ((DATASET_USER, None, None, 3, 5, False), "enter a whole user id"),
        ((NEW_USER, 3, [], 3, 5, False), "like at least one item"),
        ((DATASET_USER, 3, None, 6, 5, False), "candidates (5) must be at least k (6)"),
    ):
        status, gallery, table, *_ = app.recommend(*args)
        assert status.startswith("**Error:") and message in status and "Traceback" not in status and table is None
    status, picture, caption = app.draw(DATASET_USER, 3, None, 2, "a quiet poster", 0.0, False, 4)
    assert status == "**Drawn.**" and picture is not None and "alpha forced to 0.00" in caption
    for args, message in (
        ((DATASET_USER, 3, None, None, "", 0.5, False, 4), "the instruction is empty"),
        ((DATASET_USER, 3, None, None, "y" * 400, 0.5, False, 4), "at most"),
        ((DATASET_USER, 3, None, None, "a poster", 0.5, False, 4.5), "whole number"),
    ):
        status, picture, _ = app.draw(*args)
        assert message in status and picture is None


def _free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _browser():
    """A headless Debian chromium under Selenium, or None when either is missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if chromium is None or driver is None:
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1700",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.skipif(
    shutil.which("chromium") is None
    or shutil.which("chromedriver") is None
    or importlib.util.find_spec("selenium") is None,
    reason="Debian's chromium and chromium-driver, or selenium, are not installed",
)
def test_the_page_in_a_headless_browser(trained_joint, tmp_path):
    """Pick a user, recommend, see the ranked list and a picture; then a bad user id shows a message.
    ``DIFFREC_APP_RUN`` serves another run instead (the README's screenshot is of the demo run), and
    ``DIFFREC_APP_SCREENSHOT`` keeps the screenshot there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    served = DiffRec.load(os.environ.get("DIFFREC_APP_RUN", trained_joint["path"]))
    port = _free_port()
    page = launch(served, port=port)
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 180)
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#user-id input"))
        user = int(served.dataset.splits["test"]["uid"].iloc[0])
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(user))
        browser.find_element(By.CSS_SELECTOR, "#recommend").click()
        wait.until(lambda b: "Top" in b.find_element(By.CSS_SELECTOR, "#status").text)
        expected = served.recommend(user, *default_sizes(served.dataset.n_items))[0].title
        wait.until(lambda b: expected in b.find_element(By.CSS_SELECTOR, "#ranking").text)
        picture = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#picture img"))
        assert picture[0].get_attribute("src")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#liked-gallery img")) > 0
        shot = Path(os.environ.get("DIFFREC_APP_SCREENSHOT", tmp_path / "app.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(served.dataset.n_users + 1))
        browser.find_element(By.CSS_SELECTOR, "#recommend").click()
        wait.until(lambda b: "Error: unknown user" in b.find_element(By.CSS_SELECTOR, "#status").text)
        assert "Traceback" not in browser.page_source
    finally:
        browser.quit()
        page.close()
