"""Personalized images on tiny models in the real formats: flow-matching training, diffusers LoRA round trip,
seeded sampling, the fusion gate, CLIP scores, the VLM answer parser, item images and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import synthetic_ratings
from PIL import Image
from skimage import data as skimage_data

from minigpt4.cli import main
from minigpt4.config import SD3_ATTENTION, ClipConfig, load_config
from minigpt4.data.build import assemble_dataset, ratio_split
from minigpt4.data.contract import load_rating_dataset, save_rating_dataset
from minigpt4.data.images import import_item_images, load_image_table, render_card
from minigpt4.diffusion.generate import HeldOut, arm_personalization, generate_for_user
from minigpt4.diffusion.loading import load_sd3_pipeline
from minigpt4.diffusion.personalized import LORA_FILE, load_personalized
from minigpt4.diffusion.sampling import ImageStore, generate_images
from minigpt4.errors import DiffRecError
from minigpt4.evaluation.clip_score import ClipScorer
from minigpt4.evaluation.personalization import shuffled_donors
from minigpt4.evaluation.vlm_judge import parse_verdict, summarize_verdicts
from minigpt4.recommenders import build_recommender, load_recommender, save_recommender
from minigpt4.training.diffusion import build_personalized, build_samples, train_images, training_pairs
from minigpt4.training.engine import Engine

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="session")
def photo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six users who like four items, each pictured by a real photo from scikit-image, and a random MF."""
    root = tmp_path_factory.mktemp("photos")
    ratings, titles = synthetic_ratings(n_users=6, n_items=4, per_user=4, seed=1)
    ratings["rating"] = 5  # every pair liked: every training row is a sample
    splits, items, meta = assemble_dataset(
        ratings, titles, 4, lambda ts: ratio_split(ts, (0.6, 0.2, 0.2)), {"name": "photos", "source": "synthetic"}
    )
    dataset = save_rating_dataset(root / "photos", splits, items, meta)
    pictures = root / "pictures"
    pictures.mkdir()
    for raw_id, photo in zip(sorted(items["raw_id"]), PHOTOS):
        Image.fromarray(getattr(skimage_data, photo)()).convert("RGB").save(pictures / f"{raw_id}.png")
    import_item_images(dataset, pictures, key="raw_id")
    torch.manual_seed(0)
    mf = build_recommender(
        load_config_model({"arch": "mf", "embedding_size": 8, "init_std": 1.0}), meta["n_users"], meta["n_items"]
    )
    save_recommender(mf, load_config_model({"arch": "mf", "embedding_size": 8, "init_std": 1.0}), root / "mf")
    return dataset


def load_config_model(model: dict):
    """A validated model section."""
    from minigpt4.config import MFConfig

    return MFConfig(**model)


def sd3_config(tmp_path: Path, models: Path, dataset: Path, run: dict | None = None, model: dict | None = None) -> Path:
    """An sd3 config for the tiny models and the photo dataset."""
    config = {
        "model": {
            "arch": "sd3",
            "pipeline": {"path": str(models / "sd3"), "max_sequence_length": 4},
            "collab": {"ckpt": str(dataset.parent / "mf")},
            "flow": {"caption": "a photo of {title}", "resolution": 64},
            "sampling": {"steps": 4, "guidance_scale": 1.0},
            "clip": {"path": str(models / "clip")},
            **(model or {}),
        },
        "datasets": {"name": "photos", "path": str(dataset)},
        "run": {
            "cpu": True,
            "batch_size": 4,
            "eval_batch_size": 8,
            "lr": 3e-3,
            "max_steps": 10,
            "eval_every_steps": 5,
            "output_dir": str(tmp_path / "runs"),
            **(run or {}),
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sd3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@torch.no_grad()
def fixed_loss(model, samples, seed: int = 0, draws: int = 8) -> float:
    """The flow-matching loss over every sample with fixed noise and timesteps (comparable across training)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    index = samples.item_index
    losses = [
        model(
            model.latents(samples.latent_parameters[index], generator),
            samples.prompt_embeds[index],
            samples.pooled[index],
            samples.preference,
            generator,
        ).item()
        for _ in range(draws)
    ]
    return float(np.mean(losses))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path, photo_dataset: Path) -> dict:
    """LoRA and fusion overfitted on the four photos (at most 300 steps), with the loss before and after."""
    tmp_path = tmp_path_factory.mktemp("trained")
    # A random tiny transformer's frozen feed-forward layers and output projection cannot be steered by
    # attention LoRA alone (pretrained ones can), so the LoRA here also covers them: targets are configurable.
    lora = {
        "r": 32,
        "alpha": 32,
        "target_modules": [
            *SD3_ATTENTION,
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
            "proj_out",
        ],
    }
    run = {"max_steps": 300, "eval_every_steps": 150, "warmup_steps": 10, "lr": 1e-2}
    config = load_config(sd3_config(tmp_path, tiny_models, photo_dataset, run=run, model={"lora": lora}))
    dataset = load_rating_dataset(photo_dataset)
    model = build_personalized(config.model, dataset)
    images = load_image_table(photo_dataset, dataset.n_items)
    samples = build_samples(
        config.model,
        training_pairs(config, dataset, images),
        model,
        dataset,
        images,
        config.run.eval_batch_size,
        progress=False,
    )
    before = fixed_loss(model, samples)
    metrics = train_images(config)
    after_model = load_personalized(
        config.model,
        load_sd3_pipeline(config.model.pipeline),
        load_recommender(photo_dataset.parent / "mf"),
        Path(metrics["checkpoint"]),
    )
    after = fixed_loss(after_model, samples)
    return {
        "config": config,
        "metrics": metrics,
        "before": before,
        "after": after,
        "model": after_model,
        "samples": samples,
    }


def test_overfitting_four_images_halves_the_flow_matching_loss(trained):
    assert trained["metrics"]["steps_run"] == 300 and trained["samples"].iids == [1, 2, 3, 4]
    assert trained["after"] <= 0.5 * trained["before"], (trained["before"], trained["after"])


def test_saved_lora_is_diffusers_format_and_reproduces_the_trained_image(trained, tiny_models):
    checkpoint = Path(trained["metrics"]["checkpoint"])
    assert {
        LORA_FILE,
        "fusion.safetensors",
        "config.yaml",
        "optimizer.bin",
        "custom_checkpoint_0.pkl",
        "trainer_state.json",
    } <= {p.name for p in checkpoint.iterdir()}
    config = trained["config"]
    # A stock pipeline loads the LoRA through diffusers and changes its output.
    from diffusers import StableDiffusion3Pipeline

    stock = StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3", text_encoder_3=None, tokenizer_3=None)
    plain = stock(
        "a photo of Item 0",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=4,
        output_type="np",
    ).images
    stock.load_lora_weights(checkpoint, weight_name=LORA_FILE)
    with_lora = stock(
        "a photo of Item 0",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=4,
        output_type="np",
    ).images
    assert not np.allclose(plain, with_lora)
    # The model that trained and a fresh load of its checkpoint give the same image for the same seed.
    from minigpt4.training.diffusion import build_personalized

    dataset = load_rating_dataset(config.datasets.path)
    in_training = build_personalized(config.model, dataset)
    in_training.load_weights(checkpoint)
    preference = trained["samples"].preference[:1]
    first, _ = generate_images(in_training, preference, ["a photo of Item 0"], [7], config.model.sampling)
    second, _ = generate_images(trained["model"], preference, ["a photo of Item 0"], [7], config.model.sampling)
    assert np.abs(np.asarray(first[0], dtype=int) - np.asarray(second[0], dtype=int)).max() <= 1


def test_same_seed_same_image_and_the_gate_decides_personalization(trained):
    model, sampling, samples = trained["model"], trained["config"].model.sampling, trained["samples"]
    users = samples.preference[[0, 1]]
    assert not torch.equal(users[0], users[1])
    text = ["a photo of Item 1"] * 2
    once, alpha = generate_images(model, users, text, [3, 3], sampling)
    again, _ = generate_images(model, users, text, [3, 3], sampling)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(once, again))
    assert (alpha > 0).all()
    assert not np.array_equal(np.asarray(once[0]), np.asarray(once[1]))  # two users, same seed and text
    off, forced = generate_images(model, users, text, [3, 3], sampling, alpha_override=0.0)
    assert torch.equal(forced, torch.zeros(2)) and np.array_equal(np.asarray(off[0]), np.asarray(off[1]))
    other_seed, _ = generate_images(model, users[:1], text[:1], [4], sampling)
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(once[0]))


def test_generate_command_writes_image_and_record(trained, tmp_path, tiny_models, photo_dataset, capsys):
    config_path = sd3_config(tmp_path, tiny_models, photo_dataset, run={"ckpt": trained["metrics"]["checkpoint"]})
    assert main(["generate", "--cfg-path", str(config_path), "--user", "2", "--item", "3", "--seed", "5"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        record["user"] == 2
        and record["seed"] == 5
        and record["instruction"].startswith("a photo of")
        and record["kept"]
    )
    assert record["backbone"] == "open_clip clip" and 0 <= record["clip_t"] <= 100 and 0 <= record["clip_i"] <= 100
    folder = Path(record["folder"])
    assert (folder / record["file"]).is_file()
    assert json.loads((folder / "records.jsonl").read_text().splitlines()[-1])["file"] == record["file"]
    with pytest.raises(DiffRecError, match="unknown user id 99"):
        generate_for_user(load_config(config_path), 99, None, "a red chair", None, None)


def test_evaluate_reports_clip_scores_and_judge_verdicts_with_and_without_fusion(
    trained, tmp_path, tiny_models, photo_dataset, capsys, monkeypatch
):
    """Each arm's CLIP-T is the mean of its images' scores, each score that of the stored picture and its text;
    the judge's answers (the tiny judge generates, then one known answer is read in its place) reach the report
    as their means, an out-of-range criterion as missing, never as a default."""
    from minigpt4.evaluation import vlm_judge

    answer = 'Scores: {"consistency": 4, "accuracy": 2.5, "integrity": 7, "quality": 3} and {"quality": 0}'
    calls = []
    generated_answer = vlm_judge.parse_verdict

    def known_answer(text: str) -> vlm_judge.Verdict:
        calls.append(generated_answer(text))  # what the tiny judge said: no JSON object
        return generated_answer(answer)

    monkeypatch.setattr(vlm_judge, "parse_verdict", known_answer)
    judge = {"path": str(tiny_models / "vlm"), "max_new_tokens": 12}
    config_path = sd3_config(
        tmp_path, tiny_models, photo_dataset, run={"ckpt": trained["metrics"]["checkpoint"]}, model={"judge": judge}
    )
    assert main(["evaluate", "--cfg-path", str(config_path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs = metrics["pairs"]
    assert metrics["backbone"] == "open_clip clip" and pairs > 0 and len(calls) == 3 * pairs
    assert not any(verdict.parsed for verdict in calls)
    folder = Path(metrics["run_dir"]) / "images"
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    scorer = ClipScorer(ClipConfig(path=str(tiny_models / "clip")))
    stored = records[0]
    assert scorer.clip_t([Image.open(folder / stored["file"])], [stored["instruction"]])[0][0] == pytest.approx(
        stored["clip_t"], abs=1e-4
    )
    for variant in ("fused", "alpha0", "shuffled"):
        arm = metrics[variant]
        mine = [record["clip_t"] for record in records if record["variant"] == variant]
        assert arm["images"] == pairs == len(mine) and arm["clip_t"] == pytest.approx(np.mean(mine), abs=1e-6)
        # Too few users in the photo dataset; the known-answer cases are test_arm_personalization's.
        assert arm["personalization"]["missing"].startswith("needs 10 evaluated users")
        verdicts = arm["judge"]
        assert verdicts == {
            "model": "vlm", "judged": pairs, "unparseable": 0,
            "consistency": 4.0, "consistency_missing": 0, "accuracy": 2.5, "accuracy_missing": 0,
            "integrity": None, "integrity_missing": pairs, "quality": 3.0, "quality_missing": 0,
        }  # fmt: skip
    assert metrics["alpha0"]["alpha"] == 0.0 and metrics["fused"]["alpha"] > 0 and metrics["shuffled"]["alpha"] > 0
    assert len({metrics[variant]["clip_t"] for variant in ("fused", "alpha0")}) == 2  # the gate changed the images


def test_arm_personalization_maps_users_and_leaves_out_the_drawn_item():
    users, per_user = 12, 3
    directions = torch.eye(users)
    features = directions.repeat_interleave(per_user, dim=0)  # each user's liked items point their own way
    held_out = HeldOut(
        users=[100 + u for u in range(users)],
        items=[1000 + i for i in range(users * per_user)],
        features=features,
        liked=[[per_user * u + k for k in range(per_user)] for u in range(users)],
        history=[[per_user * u] for u in range(users)],
    )
    records = [
        {"user": 100 + u, "item": 1000 + per_user * u} for u in range(users)
    ]  # drew each user's first liked item
    own = arm_personalization(held_out, records, directions.clone(), seed=0)
    assert own["identification_acc1"] == 1.0 and own["margin"] == pytest.approx(100.0) and own["users"] == users
    swapped = arm_personalization(
        held_out, records, directions.roll(1, dims=0), seed=0
    )  # every image made for a neighbour
    assert swapped["identification_acc1"] == 0.0 and swapped["margin"] < 0
    assert arm_personalization(
        HeldOut(held_out.users[:9], held_out.items, features, held_out.liked[:9], held_out.history[:9]),
        records[:9],
        directions[:9],
        0,
    ) == {"missing": "needs 10 evaluated users with 2 or more held-out liked items; 9 have them"}


def test_shuffled_donors_never_give_a_pair_its_own_user():
    users = np.array([1, 1, 1, 2, 3, 3, 4, 5, 5, 5])
    donors = shuffled_donors(users, seed=3)
    assert (users[donors] != users).all()
    assert (shuffled_donors(np.array([7, 7, 7]), seed=0) >= 0).all()  # one user only: nothing to swap with


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, tiny_models, photo_dataset, monkeypatch):
    run = {"max_steps": 6, "eval_every_steps": 3}
    original = Engine.save_checkpoint

    def keep_step_three(self, folder, progress):
        original(self, folder, progress)
        if progress["step"] == 3:
            shutil.copytree(folder, tmp_path / "step3")

    monkeypatch.setattr(Engine, "save_checkpoint", keep_step_three)
    straight = train_images(load_config(sd3_config(tmp_path / "a", tiny_models, photo_dataset, run=run)))
    monkeypatch.setattr(Engine, "save_checkpoint", original)
    resumed = train_images(
        load_config(
            sd3_config(tmp_path / "b", tiny_models, photo_dataset, run={**run, "resume_from": str(tmp_path / "step3")})
        )
    )
    assert [p["step"] for p in resumed["curve"]] == [1, 2, 3, 4, 5, 6]
    assert [p["loss"] for p in resumed["curve"]] == pytest.approx([p["loss"] for p in straight["curve"]], rel=1e-5)
    from safetensors.torch import load_file

    weights = [load_file(Path(result["checkpoint"]) / LORA_FILE) for result in (straight, resumed)]
    assert all(torch.allclose(weights[0][key], weights[1][key], atol=1e-6) for key in weights[0])


def test_clip_scores(tiny_models):
    scorer = ClipScorer(ClipConfig(path=tiny_models / "clip", batch_size=2))
    photos = [Image.fromarray(getattr(skimage_data, name)()).convert("RGB") for name in PHOTOS[:3]]
    assert scorer.clip_i(photos[:1], [photos[:1]])[0] == pytest.approx(100.0, abs=1e-3)
    texts = ["an astronaut", "a cup of coffee", "a cat " * 60]
    batched, truncated = scorer.clip_t(photos, texts)
    one_by_one = [scorer.clip_t([photo], [text])[0][0] for photo, text in zip(photos, texts)]
    assert batched == pytest.approx(one_by_one, abs=1e-4) and truncated == 1
    assert all(0 <= score <= 100 for score in batched)
    assert scorer.clip_i(photos[:2], [[], photos[1:3]])[0] is None
    empty = tiny_models / "no-weights"
    empty.mkdir()
    shutil.copy(tiny_models / "clip" / "open_clip_config.json", empty)
    with pytest.raises(DiffRecError, match="no weights file"):
        ClipScorer(ClipConfig(path=empty))


def test_vlm_answer_parser():
    valid = parse_verdict('Sure. {"consistency": 4, "accuracy": 3.5, "integrity": 5, "quality": 2} Done.')
    assert valid.parsed and valid.scores == {"consistency": 4.0, "accuracy": 3.5, "integrity": 5.0, "quality": 2.0}
    partial = parse_verdict('{"consistency": 4, "accuracy": "good", "integrity": 9}')
    assert partial.parsed and partial.scores == {
        "consistency": 4.0,
        "accuracy": None,
        "integrity": None,
        "quality": None,
    }
    garbage = parse_verdict("I think it is a nice picture {not json")
    assert not garbage.parsed and set(garbage.scores.values()) == {None}
    summary = summarize_verdicts([valid, partial, garbage])
    assert summary["unparseable"] == 1 and summary["consistency"] == 4.0 and summary["quality"] == 2.0
    assert summary["accuracy_missing"] == 2 and summary["quality_missing"] == 2


def test_image_import_rejects_bad_pictures(tmp_path, photo_dataset):
    dataset = tmp_path / "copy"
    shutil.copytree(photo_dataset, dataset)
    items = load_rating_dataset(dataset).items
    pictures = tmp_path / "pictures"
    with pytest.raises(DiffRecError, match="image folder not found"):
        import_item_images(dataset, pictures)
    pictures.mkdir()
    raw = sorted(items["raw_id"])
    Image.fromarray(skimage_data.astronaut()).save(pictures / f"{raw[0]}.png")
    (pictures / f"{raw[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (16, 16)).save(pictures / f"{raw[2]}.png")
    with pytest.raises(DiffRecError) as failure:
        import_item_images(dataset, pictures)
    message = str(failure.value)
    assert "3 of 4 items have no usable image" in message and "not a readable image" in message
    assert "smaller than the minimum side 64" in message and f"no image in {pictures}" in message
    before = (dataset / "images.parquet").read_bytes()
    assert result_is_unchanged(dataset, before)
    counts = import_item_images(dataset, pictures, on_bad="exclude")
    assert counts == {"images": 1, "excluded": 3, "items": 4}
    assert load_image_table(dataset, 4)["iid"].tolist() == [int(items.set_index("raw_id").loc[raw[0], "iid"])]


def result_is_unchanged(dataset: Path, before: bytes) -> bool:
    """A failed import leaves the earlier images table as it was."""
    return (dataset / "images.parquet").read_bytes() == before


def test_training_fails_clearly_on_a_corrupt_image_file(tmp_path, tiny_models, photo_dataset):
    dataset = tmp_path / "copy"
    shutil.copytree(photo_dataset, dataset)
    shutil.copytree(photo_dataset.parent / "mf", tmp_path / "mf")
    table = pd.read_parquet(dataset / "images.parquet")
    (dataset / table["path"][0]).write_bytes(b"garbage")
    config = load_config(sd3_config(tmp_path, tiny_models, dataset))
    with pytest.raises(DiffRecError, match=rf"{table['path'][0]}: not a readable image"):
        train_images(config)
    assert not (tmp_path / "runs").exists()  # it fails before any run folder is made


def test_rendered_cards_are_deterministic(tmp_path):
    first, second = (
        render_card("Toy Story (1995)", ["Animation", "Comedy"], 96),
        render_card("Toy Story (1995)", ["Animation", "Comedy"], 96),
    )
    assert np.array_equal(np.asarray(first), np.asarray(second)) and first.size == (96, 96)
    assert not np.array_equal(np.asarray(first), np.asarray(render_card("Heat (1995)", ["Crime"], 96)))


def test_image_store_keeps_the_best(tmp_path):
    store = ImageStore(tmp_path / "images", keep_best=2, max_images=3)
    image = Image.new("RGB", (8, 8))
    kept = [
        store.add(image, {"user": 1, "item": 1, "instruction": "x", "seed": seed, "score": score})["kept"]
        for seed, score in enumerate([10, 30, 20, 5])
    ]
    assert kept == [True, True, True, False]
    assert sorted(r["score"] for r in store.records) == [20, 30]
    for seed, score in enumerate([50, 40]):
        store.add(image, {"user": 2, "item": 1, "instruction": "x", "seed": seed, "score": score})
    assert sorted(r["score"] for r in store.records) == [30, 40, 50]
    assert len(list((tmp_path / "images").glob("*.png"))) == 3
    reopened = ImageStore(tmp_path / "images", keep_best=2, max_images=3)
    assert [r["file"] for r in reopened.records] == [r["file"] for r in store.records]


def test_sd3_config_errors(tmp_path, tiny_models, photo_dataset):
    path = sd3_config(tmp_path, tiny_models, photo_dataset, model={"fusion": {"tokenz": 2}})
    with pytest.raises(DiffRecError, match="unknown key 'model.fusion.tokenz'; did you mean 'model.fusion.tokens'"):
        load_config(path)
    config = load_config(sd3_config(tmp_path, tiny_models, photo_dataset))
    config.model.pipeline.path = tmp_path / "nowhere"
    with pytest.raises(DiffRecError, match="no model_index.json"):
        load_sd3_pipeline(config.model.pipeline)


def test_generic_and_empty_instructions_replace_captions_at_the_configured_rates():
    from minigpt4.config import FlowMatchingConfig
    from minigpt4.training.diffusion import ImageSamples

    items, count = 5, 20_000
    samples = ImageSamples(
        preference=None, item_index=torch.arange(count) % items, latent_parameters=torch.zeros(items, 1),
        prompt_embeds=torch.arange(items, dtype=torch.float32)[:, None, None].expand(items, 3, 2).clone(), pooled=torch.arange(items, dtype=torch.float32)[:, None].expand(items, 2).clone(),
        iids=list(range(1, items + 1)), other_prompt_embeds=torch.tensor([-1.0, -2.0])[:, None, None].expand(2, 3, 2).clone(), other_pooled=torch.tensor([[-1.0, -1.0], [-2.0, -2.0]]),
    )  # fmt: skip
    rows = list(range(count))
    flow = FlowMatchingConfig(generic_rate=0.3, caption_dropout=0.2)
    prompt_embeds, pooled = samples.captions(rows, flow, torch.Generator().manual_seed(0))
    kind = pooled[:, 0]
    assert abs((kind == -1).float().mean() - 0.3) < 0.015 and abs((kind == -2).float().mean() - 0.2) < 0.015
    kept = kind >= 0
    assert torch.equal(kind[kept], samples.item_index[kept].float())  # the rest keep their item's caption
    assert torch.equal(prompt_embeds[:, 0, 0], kind)  # sequence and pooled embeddings replaced together
    untouched = torch.Generator().manual_seed(0)
    plain, _ = samples.captions(rows, FlowMatchingConfig(), untouched)
    assert torch.equal(plain[:, 0, 0], samples.item_index.float()) and torch.equal(
        untouched.get_state(), torch.Generator().manual_seed(0).get_state()
    )
    with pytest.raises(ValueError, match="exceeds 1"):
        FlowMatchingConfig(generic_rate=0.7, caption_dropout=0.4)


# Run under accelerate launch: train_images, recording each process's first micro-batch (its rows and loss).
FIRST_MICRO_BATCH = """import json, sys
from pathlib import Path
from accelerate import PartialState
from minigpt4.config import load_config
from minigpt4.training import diffusion

loss = diffusion.ImageTask.loss

def recorded(self, model, batch, where):
    parts = loss(self, model, batch, where)
    if where.position == 0:
        first = {"rows": [int(row) for row in batch], "loss": parts["loss"].item(), "noise": where.generator.initial_seed()}
        Path(sys.argv[2], f"{PartialState().process_index}.json").write_text(json.dumps(first))
    return parts

diffusion.ImageTask.loss = recorded
metrics = diffusion.train_images(load_config(sys.argv[1]))
if PartialState().is_main_process:
    print(json.dumps(metrics))
"""


def test_two_processes_draw_their_own_rows_and_noise(tmp_path, tiny_models, photo_dataset):
    """Under ``accelerate launch`` each process trains on its share of the pass: process 0 draws the rows and
    noise a single process draws (the same first loss), process 1 other rows from a noise stream of its own."""
    import os
    import subprocess
    import sys

    script = tmp_path / "first_micro_batch.py"
    script.write_text(FIRST_MICRO_BATCH)
    run = {"max_steps": 1, "eval_every_steps": 1, "warmup_steps": 0}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    firsts = {}
    for processes in (1, 2):
        folder = tmp_path / str(processes)
        config = sd3_config(folder, tiny_models, photo_dataset, run=run)
        spread = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
        done = subprocess.run([*launcher, *spread, str(script), str(config), str(folder)], cwd=root, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        metrics = json.loads(done.stdout.strip().splitlines()[-1])
        assert metrics["steps_run"] == 1
        firsts[processes] = [json.loads((folder / f"{rank}.json").read_text()) for rank in range(processes)]
    (single,), (zero, one) = firsts[1], firsts[2]
    assert zero["rows"] == single["rows"] and zero["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert set(one["rows"]).isdisjoint(zero["rows"]) and one["loss"] != pytest.approx(zero["loss"], rel=1e-4)
    assert zero["noise"] == single["noise"] != one["noise"]


def test_standardized_fusion_keeps_the_training_preferences_statistics(tmp_path, tiny_models, photo_dataset):
    from safetensors.torch import load_file

    config = load_config(
        sd3_config(
            tmp_path,
            tiny_models,
            photo_dataset,
            run={"max_steps": 1, "eval_every_steps": 1},
            model={"fusion": {"standardize": True}},
        )
    )
    checkpoint = Path(train_images(config)["checkpoint"])
    dataset = load_rating_dataset(photo_dataset)
    images = load_image_table(photo_dataset, dataset.n_items)
    samples = build_samples(
        config.model,
        training_pairs(config, dataset, images),
        build_personalized(config.model, dataset),
        dataset,
        images,
        8,
        progress=False,
    )
    saved = load_file(checkpoint / "fusion.safetensors")
    assert torch.allclose(saved["preference_mean"], samples.preference.mean(0)) and torch.allclose(
        saved["preference_std"], samples.preference.std(0)
    )
    loaded = load_personalized(
        config.model,
        load_sd3_pipeline(config.model.pipeline),
        load_recommender(photo_dataset.parent / "mf"),
        checkpoint,
    )
    assert torch.allclose(loaded.fusion.preference_mean, samples.preference.mean(0))
    standardized = (samples.preference - loaded.fusion.preference_mean) / loaded.fusion.preference_std
    assert standardized.mean(0).abs().max() < 1e-5 and (standardized.std(0) - 1).abs().max() < 1e-4


def test_non_finite_gradient_norm_stops_the_image_training(tmp_path, tiny_models, photo_dataset, monkeypatch):
    from minigpt4.training import diffusion as training_diffusion

    real = training_diffusion.build_personalized

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        model.fusion.to_pooled.weight.register_hook(lambda grad: grad * float("inf"))
        return model

    monkeypatch.setattr(training_diffusion, "build_personalized", poisoned)
    config = load_config(sd3_config(tmp_path, tiny_models, photo_dataset, run={"max_steps": 4, "eval_every_steps": 2}))
    with pytest.raises(
        DiffRecError,
        match=r"gradient norm became (inf|nan) at epoch 1, step 0; training stopped, the last checkpoint is kept at \(none yet\)",
    ):
        train_images(config)


def test_resume_from_latest_continues_the_newest_run(tmp_path, tiny_models, photo_dataset):
    """Of two finished runs under run.output_dir, ``latest`` continues the newer (its curve, not the older's)."""
    older = train_images(
        load_config(
            sd3_config(tmp_path, tiny_models, photo_dataset, run={"max_steps": 2, "eval_every_steps": 2, "seed": 1})
        )
    )
    first = train_images(
        load_config(sd3_config(tmp_path, tiny_models, photo_dataset, run={"max_steps": 2, "eval_every_steps": 2}))
    )
    assert older["curve"][0]["loss"] != first["curve"][0]["loss"]
    resumed = train_images(
        load_config(
            sd3_config(
                tmp_path,
                tiny_models,
                photo_dataset,
                run={"max_steps": 3, "eval_every_steps": 3, "resume_from": "latest"},
            )
        )
    )
    assert [point["step"] for point in resumed["curve"]] == [1, 2, 3] and resumed["curve"][:2] == first["curve"]
