"""Personalization metrics: zero and chance when nothing is personal, full marks when each output is its
user's own, a permutation p-value that is roughly uniform when nothing is there, and a copy guard."""

from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt4.errors import DiffRecError
from minigpt4.evaluation.personalization import (
    draw_distractors,
    identification_accuracy,
    index_items,
    personalization_metrics,
    shuffled_donors,
    user_similarity,
)


def random_users(users: int, items: int, per_user: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Gaussian item embeddings and each user's liked rows."""
    rng = np.random.default_rng(seed)
    embeddings = torch.as_tensor(rng.normal(size=(items, 16)), dtype=torch.float32)
    return embeddings, [sorted(rng.choice(items, size=per_user, replace=False).tolist()) for _ in range(users)]


def test_the_same_output_for_everyone_is_not_personal():
    items, liked = random_users(users=200, items=500, per_user=4, seed=0)
    same = torch.randn(1, 16, generator=torch.Generator().manual_seed(1)).expand(200, 16)
    metrics = personalization_metrics(same, range(200), items, liked, permutations=200)
    assert abs(metrics["margin"]) < 1e-4  # exactly 0 in exact arithmetic: every user's score counts once as own
    assert 0.03 <= metrics["identification_acc1"] <= 0.18 and metrics["identification_chance"] == 0.1
    assert metrics["identification_p_value"] > 0.01


def test_each_output_being_its_users_own_items_scores_full_marks():
    users = 20
    items = torch.eye(users).repeat_interleave(2, dim=0)  # user u's two liked items both point along axis u
    liked = [[2 * u, 2 * u + 1] for u in range(users)]
    outputs = torch.eye(users) * 3.0  # scale does not matter: cosine
    metrics = personalization_metrics(outputs, range(users), items, liked, history=liked, permutations=200)
    assert metrics["personal_similarity"] == pytest.approx(100.0)
    assert metrics["margin"] == pytest.approx(100.0)
    assert metrics["identification_acc1"] == 1.0
    assert metrics["identification_p_value"] == pytest.approx(1 / 201)
    assert metrics["copy_guard"] == {"mean": pytest.approx(100.0), "max": pytest.approx(100.0)}  # a copy shows as one


def test_p_value_is_roughly_uniform_when_outputs_carry_no_user():
    p_values = []
    for seed in range(20):
        items, liked = random_users(users=50, items=300, per_user=3, seed=seed)
        outputs = torch.as_tensor(np.random.default_rng(seed + 100).normal(size=(50, 16)), dtype=torch.float32)
        p_values.append(
            personalization_metrics(outputs, range(50), items, liked, permutations=200, seed=seed)[
                "identification_p_value"
            ]
        )
    p_values = np.asarray(p_values)
    assert 0.25 <= p_values.mean() <= 0.75
    assert (p_values < 0.05).mean() <= 0.2


def test_identification_counts_ties_and_unscored_owners_as_misses():
    """Strictly above every distractor: a tie misses, an owner without a score misses, a distractor without one
    cannot win."""
    owner, distractors = np.array([0, 1, 2]), np.array([[1, 2], [0, 2], [0, 1]])
    assert identification_accuracy(np.full((3, 3), 5.0), owner, distractors) == 0.0
    similarity = np.array([[9.0, 1.0, 1.0], [np.nan, 2.0, 1.0], [1.0, 1.0, np.nan]])
    assert identification_accuracy(similarity, owner, distractors) == pytest.approx(2 / 3)
    similarity[1, 1] = np.nan  # owner 1 has no score now
    assert identification_accuracy(similarity, owner, distractors) == pytest.approx(1 / 3)


def test_user_similarity_means_and_leaves_out_the_drawn_item():
    """Each output's mean score over each user's liked items, with output n's own item left out of every user."""
    scores = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]])
    liked = [[0, 1], [1, 2, 3]]
    assert np.allclose(user_similarity(scores, liked), [[15.0, 30.0], [1.5, 3.0]])
    left_out = user_similarity(scores, liked, exclude=[1, 0])
    assert np.allclose(left_out, [[10.0, 35.0], [2.0, 3.0]])
    only = user_similarity(scores, [[1], [2, 3]], exclude=[1, 1])  # user 0's only item left out: no score
    assert np.isnan(only[0, 0]) and only[0, 1] == 35.0 and np.isnan(only[1, 0])


def test_distractors_are_distinct_other_users():
    owner = np.repeat(np.arange(12), 5)
    picks = draw_distractors(owner, 12, 10, np.random.default_rng(0))
    assert picks.shape == (60, 9)
    assert all(owner[row] not in picks[row] and len(set(picks[row])) == 9 for row in range(60))


def test_too_few_users_or_an_empty_user_is_an_error():
    items, liked = random_users(users=5, items=50, per_user=2, seed=0)
    with pytest.raises(DiffRecError, match="at least 10 users"):
        personalization_metrics(torch.randn(5, 16), range(5), items, liked)
    items, liked = random_users(users=10, items=50, per_user=2, seed=0)
    liked[3] = []
    with pytest.raises(DiffRecError, match="user 3 has no held-out liked item"):
        personalization_metrics(torch.randn(10, 16), range(10), items, liked)


def test_the_item_an_output_was_asked_for_never_counts_for_its_user():
    """An image drawn from an item's caption resembles that item; leaving it out keeps that from reading as personal."""
    users = 60
    rng = np.random.default_rng(0)
    items = torch.as_tensor(rng.normal(size=(users * 4, 16)), dtype=torch.float32)
    liked = [[4 * u, 4 * u + 1, 4 * u + 2, 4 * u + 3] for u in range(users)]
    targets = [4 * u for u in range(users)]
    outputs = items[targets]  # each output is exactly the item it was asked to draw
    naive = personalization_metrics(outputs, range(users), items, liked, permutations=100)
    fair = personalization_metrics(outputs, range(users), items, liked, exclude=targets, permutations=100)
    assert naive["margin"] > 15 and naive["identification_acc1"] > 0.9
    assert abs(fair["margin"]) < 3 and fair["identification_acc1"] < 0.3 and fair["scored_outputs"] == users


def test_margin_is_own_minus_each_outputs_own_mean_over_the_others():
    """Figures worked by hand on 10 users, one liked item each on its own axis: output n points between its
    owner's axis (weight 2) and user n + 1's (weight 1), so it scores 100 x 2/sqrt(5) for its owner, 100 x
    1/sqrt(5) for user n + 1 and 0 for the rest."""
    users = 10
    items, liked = torch.eye(users), [[u] for u in range(users)]
    outputs = 2 * torch.eye(users) + torch.eye(users).roll(1, dims=1)
    metrics = personalization_metrics(outputs, range(users), items, liked, history=[[]] * users, permutations=10)
    own, other = 200 / 5**0.5, 100 / 5**0.5
    assert metrics["outputs"] == users and metrics["users"] == users and metrics["scored_outputs"] == users
    assert metrics["personal_similarity"] == pytest.approx(own)
    assert metrics["margin"] == pytest.approx(own - other / (users - 1))
    assert metrics["copy_guard"] is None  # no user has a history item
    # Output 0 leaves out user 1's only item, so its others' mean is over 8 users (all 0); every other output
    # leaves out its owner's only item, so it is not scored: the margin is output 0's alone.
    left_out = personalization_metrics(outputs, range(users), items, liked, exclude=[1, *range(1, users)],
                                       permutations=10)  # fmt: skip
    assert left_out["scored_outputs"] == 1 and left_out["margin"] == pytest.approx(own)


def test_unscored_outputs_leave_the_means_missing_not_zero():
    """With every owner's only liked item left out, no output is scored: the means are missing (None)."""
    users = 10
    items, liked = torch.eye(users), [[u] for u in range(users)]
    metrics = personalization_metrics(torch.eye(users), range(users), items, liked, exclude=list(range(users)),
                                      permutations=10)  # fmt: skip
    assert metrics["scored_outputs"] == 0 and metrics["personal_similarity"] is None and metrics["margin"] is None
    half = personalization_metrics(torch.eye(users), range(users), items, liked,
                                   exclude=[0, 1, 2, 3, 4] + [u + 1 for u in range(5, 9)] + [0], permutations=10)  # fmt: skip
    assert half["scored_outputs"] == 5 and half["personal_similarity"] == pytest.approx(100.0)


def test_the_p_value_counts_permutations_at_or_above_the_observed_accuracy():
    """An output that never identifies its user (accuracy 0) is matched by every permutation: p = 1. The
    p-value's denominator is 1 + the number of permutations (1000 by default)."""
    users = 10
    items, liked = torch.eye(users), [[u] for u in range(users)]
    same = torch.ones(users, users)  # every user scores the same: a tie, never strictly above
    assert personalization_metrics(same, range(users), items, liked, permutations=30)["identification_p_value"] == 1.0
    own = personalization_metrics(torch.eye(users), range(users), items, liked)
    assert own["identification_acc1"] == 1.0 and own["identification_p_value"] == pytest.approx(1 / 1001)


def test_the_same_seed_gives_the_same_distractors_and_p_value():
    items, liked = random_users(users=30, items=200, per_user=3, seed=4)
    outputs = torch.as_tensor(np.random.default_rng(9).normal(size=(30, 16)), dtype=torch.float32)
    first, again = (
        personalization_metrics(outputs, range(30), items, liked, permutations=50, seed=2) for _ in range(2)
    )
    assert first == again


def test_an_unscored_owner_or_distractor_reads_as_minus_infinity():
    """Scores below zero (possible for a user-similarity matrix built elsewhere) against a missing score: the
    missing one never wins, and an owner without a score never identifies."""
    owner, distractors = np.array([0, 1]), np.array([[1], [0]])
    similarity = np.array([[-0.2, np.nan], [-0.5, np.nan]])
    assert identification_accuracy(similarity, owner, distractors) == 0.5


def test_distractors_when_every_other_user_is_needed():
    """k equal to the number of users: the k - 1 distractors are exactly the other users."""
    owner = np.arange(10)
    picks = draw_distractors(owner, 10, 10, np.random.default_rng(3))
    assert all(sorted(picks[row]) == [u for u in range(10) if u != row] for row in range(10))


def test_index_items_lists_each_item_once_and_maps_both_lists_to_rows():
    items, liked, history = index_items([[30, 10], [20]], [[10], [40, 30]])
    assert items == [10, 20, 30, 40] and liked == [[2, 0], [1]] and history == [[0], [3, 2]]


def test_shuffled_donors_are_reproducible_from_their_seed():
    users = np.array([1, 1, 2, 3, 3, 4])
    donors = shuffled_donors(users, seed=5)
    assert np.array_equal(donors, shuffled_donors(users, seed=5)) and (users[donors] != users).all()
    assert any(not np.array_equal(donors, shuffled_donors(users, seed)) for seed in range(6, 12))


def test_holdout_keeps_each_users_latest_liked_items_out_of_image_training(card_dataset, tmp_path):
    from minigpt4.data.contract import load_rating_dataset
    from minigpt4.data.images import liked_rows, load_holdout, load_image_table, personal_holdout

    dataset = load_rating_dataset(card_dataset)
    images = load_image_table(card_dataset, dataset.n_items)
    holdout = personal_holdout(dataset, images, users=8, items=2, seed=3)
    assert (
        personal_holdout(dataset, images, users=8, items=2, seed=3).users == holdout.users and len(holdout.users) == 8
    )  # seeded
    liked = liked_rows(dataset, "train", images)
    for user, held, row, kept in zip(holdout.users, holdout.held_out, holdout.rows.itertuples(), holdout.liked):
        theirs = liked[liked["uid"] == user].sort_values("timestamp", kind="stable")
        assert held == [int(iid) for iid in theirs["iid"].tail(2)]  # the most recent two
        assert row.uid == user and row.iid not in held and row.timestamp <= theirs["timestamp"].tail(2).min()
        assert set(held).isdisjoint(set(row.his)) and set(held).isdisjoint(kept)  # the preference row has not seen them
    remaining = holdout.drop_from(liked)
    assert len(remaining) == len(liked) - 16
    assert not any(
        (int(u), int(i)) in {(user, item) for user, items in zip(holdout.users, holdout.held_out) for item in items}
        for u, i in zip(remaining["uid"], remaining["iid"])
    )
    holdout.save(tmp_path)
    again = load_holdout(tmp_path, dataset, images)
    assert again.users == holdout.users and again.held_out == holdout.held_out and again.rows.equals(holdout.rows)
    assert load_holdout(tmp_path / "elsewhere", dataset, images) is None
    with pytest.raises(DiffRecError, match="only .* users have 40 or more liked items"):
        personal_holdout(dataset, images, users=8, items=20, seed=3)
    for content, message in (
        ('[{"user": 1, "held_out": [', "holdout.json: not valid JSON"),
        ('[{"user": 1}]', "holdout.json: expected a list"),
        ("[]", "holdout.json: holds no user"),
        ('[{"user": 1, "held_out": [9999]}]', "user 1's held-out items are not among their liked training items"),
    ):
        (tmp_path / "holdout.json").write_text(content)
        with pytest.raises(DiffRecError, match=message):
            load_holdout(tmp_path, dataset, images)


def test_reply_prompts_use_the_chat_template_and_keep_slots(tiny_llm):
    import pandas as pd
    from transformers import AutoTokenizer

    from minigpt4.llm.prompts import PromptTemplate, encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    template = PromptTemplate.load(
        Path(__file__).resolve().parents[1] / "prompts" / "collm_movie.txt"
    )  # with slots; reply_movie.txt has none
    frame = pd.DataFrame({"his_title": [["Heat", "Alien"]], "title": ["Fargo"]})
    plain = encode_prompts(template, frame, tokenizer, 5, 256, "t")
    chat = encode_prompts(template, frame, tokenizer, 5, 256, "t", chat=True)
    text = tokenizer.decode(chat.input_ids[0])
    assert text.count("<|im_start|>user") == 1 and text.rstrip().endswith("<|im_start|>assistant")
    assert tokenizer.decode(plain.input_ids[0]).strip() in text and len(chat.input_ids[0]) > len(plain.input_ids[0])
    for slot, positions in chat.slot_positions.items():
        assert chat.input_ids[0][positions[0]] == tokenizer.pad_token_id, slot  # the slots survive the wrapping
    reply = encode_prompts(
        PromptTemplate.load(Path(__file__).resolve().parents[1] / "prompts" / "reply_movie.txt"),
        frame,
        tokenizer,
        5,
        256,
        "t",
        chat=True,
    )
    text = tokenizer.decode(reply.input_ids[0])
    assert (
        text.startswith("<|im_start|>system")
        and text.count("<|im_start|>user") == 1
        and text.rstrip().endswith("<|im_start|>assistant")
        and '"Fargo"' in text
    )
