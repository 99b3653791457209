"""The LLM recommender: prompts, two-row Yes/No scoring, CoRA injection (with and without gradient
checkpointing), CoLLM slots, checkpoints (save/load, evaluate, resume), replies and user errors.

A tiny Llama (2 layers, hidden 32) with SmolLM2's real tokenizer stands in for the LLM; it is saved as
a Hugging Face folder and loaded through the same loader as real weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import assert_cora_reads_the_user_vector
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from minigpt4.cli import main
from minigpt4.config import LLMConfig, dump_config, load_config
from minigpt4.data.contract import load_rating_dataset
from minigpt4.errors import DiffRecError
from minigpt4.llm import scoring
from minigpt4.llm.loading import bundled_smollm2_folder, load_causal_lm, load_tokenizer
from minigpt4.llm.prompts import PromptTemplate, encode_prompts
from minigpt4.llm.recommender import build_llm_recommender
from minigpt4.llm.scoring import answer_token_ids, full_vocabulary_yes_no, shared_prefix_length, yes_no_logits
from minigpt4.training import llm as training_llm
from minigpt4.training.engine import Engine
from minigpt4.training.llm import split_prompt_rows
from minigpt4.training.run_folder import TRAINER_STATE

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "prompts"


def llm_config(
    folder: Path,
    dataset: Path,
    llm: Path,
    mode: str = "cora",
    collab: Path | None = None,
    model: dict | None = None,
    run: dict | None = None,
) -> Path:
    """An llmrec config with fast settings; collm reads the slot template."""
    template = "collm_movie.txt" if mode == "collm" else "tallrec_movie.txt"
    config = {
        "model": {
            "arch": "llmrec", "mode": mode, "llm": {"path": str(llm), "max_length": 128},
            "prompt": {"template": str(PROMPTS / template), "max_history": 5},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "cora": {"rank": 8, "alpha": 16, "queries": 4, "width": 16, "heads": 2},
            "collm": {"hidden": 16}, "reply": {"template": str(PROMPTS / "reply_movie.txt"), "max_new_tokens": 8},
            **({"collab": {"ckpt": str(collab)}} if mode != "tallrec" else {}), **(model or {}),
        },
        "datasets": {"name": "tiny", "path": str(dataset)},
        "run": {
            "cpu": True, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3, "max_steps": 4, "eval_every_steps": 2, "patience": 5,
            "train_rows": 64, "valid_rows": 48, "test_rows": 48, "output_dir": str(folder / "runs"), **(run or {}),
        },
    }  # fmt: skip
    path = folder / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build(path: Path, options: list[str] | None = None):
    """Config, model and tokenized splits for a config file."""
    config = load_config(path, options)
    dataset = load_rating_dataset(config.datasets.path)
    torch.manual_seed(config.run.seed)
    model, tokenizer, template = build_llm_recommender(config.model, dataset)
    return config, model, split_prompt_rows(config, dataset, model, tokenizer, template)


def first_rows(rows, count: int = 8):
    return rows.__getitems__(list(range(count)))


def one_step(model, batch, lr: float = 0.05) -> None:
    """One AdamW step on the trainable parameters."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(batch).backward()
    optimizer.step()
    optimizer.zero_grad()


# --- prompts ---------------------------------------------------------------------------------------


def test_prompt_keeps_recent_history_aligned(tiny_llm):
    tokenizer = load_tokenizer(LLMConfig(path=tiny_llm))
    template = PromptTemplate.load(PROMPTS / "tallrec_movie.txt")
    frame = pd.DataFrame({"his": [[1, 2, 3]], "his_title": [["Old", "Middle", "New"]], "title": ["Target"]})
    text = tokenizer.decode(encode_prompts(template, frame, tokenizer, 2, 256, "t").input_ids[0])
    assert '"Middle", "New"' in text and "Old" not in text and '"Target"' in text and text.endswith("Answer:")
    # Too long for max_length: the oldest titles go first.
    full = len(encode_prompts(template, frame, tokenizer, 3, 256, "t").input_ids[0])
    short = encode_prompts(template, frame, tokenizer, 3, full - 1, "t").input_ids[0]
    assert len(short) < full and '"Middle", "New"' in tokenizer.decode(short) and "Old" not in tokenizer.decode(short)


def test_collm_slots_are_single_tokens_at_recorded_positions(tiny_llm):
    tokenizer = load_tokenizer(LLMConfig(path=tiny_llm))
    template = PromptTemplate.load(PROMPTS / "collm_movie.txt")
    frame = pd.DataFrame({"his_title": [["A"], []], "title": ["T1", "T2"]})
    encoded = encode_prompts(template, frame, tokenizer, 10, 256, "t")
    for row, ids in enumerate(encoded.input_ids):
        for slot in ("<UserID>", "<TargetItemID>"):
            assert ids[encoded.slot_positions[slot][row]] == tokenizer.pad_token_id
    assert "none" in tokenizer.decode(encoded.input_ids[1])  # an empty history is written as such


def test_unknown_and_unfilled_placeholders_fail_by_name(tiny_llm, tmp_path):
    tokenizer = load_tokenizer(LLMConfig(path=tiny_llm))
    (tmp_path / "bad.txt").write_text("History: {history_titels}\nAnswer:")
    with pytest.raises(DiffRecError, match=r"unknown placeholder \{history_titels\}"):
        PromptTemplate.load(tmp_path / "bad.txt")
    (tmp_path / "slot.txt").write_text("User <UserId>\nAnswer:")
    with pytest.raises(DiffRecError, match="unknown slot <UserId>"):
        PromptTemplate.load(tmp_path / "slot.txt")
    amazon = PromptTemplate.load(PROMPTS / "tallrec_amazon.txt")
    frame = pd.DataFrame({"his_title": [["A"]], "title": ["T"]})
    with pytest.raises(DiffRecError, match=r"\{instruction\} needs column 'instruction', which movies lacks"):
        encode_prompts(amazon, frame, tokenizer, 10, 256, "movies")
    frame = pd.DataFrame({"his_title": [["A"], ["B"]], "title": ["T", "U"], "instruction": ["Find a gift", " "]})
    with pytest.raises(DiffRecError, match=r"shop, row 1: placeholder \{instruction\} is unfilled"):
        encode_prompts(amazon, frame, tokenizer, 10, 256, "shop")


def test_answer_words_must_be_single_tokens(tiny_llm, monkeypatch):
    tokenizer = load_tokenizer(LLMConfig(path=tiny_llm))
    yes, no = answer_token_ids(tokenizer, "Answer:")
    assert tokenizer.decode([yes]).strip() == "Yes" and tokenizer.decode([no]).strip() == "No"
    monkeypatch.setattr(scoring, "ANSWER_WORDS", ("Yesteryearish", "No"))
    with pytest.raises(DiffRecError, match="'Yesteryearish' after 'Answer:' is .* tokens"):
        answer_token_ids(tokenizer, "Answer:")


# --- scoring and injection --------------------------------------------------------------------------


@pytest.mark.parametrize("llm", ["tiny", "smollm2"])
def test_two_row_scoring_equals_full_logits(llm, tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    path = tiny_llm if llm == "tiny" else bundled_smollm2_folder()
    config, model, rows = build(llm_config(tmp_path, tiny_dataset, path, "cora", mf_checkpoint))
    one_step(model, first_rows(rows["train"]))  # B != 0: the CoRA update is part of both computations
    model.eval()
    batch = first_rows(rows["test"])
    assert batch.attention_mask.sum(1).unique().numel() > 1  # rows of different lengths, right-padded
    with torch.no_grad():
        embeds = model.prepare_inputs(batch)
        two_rows = yes_no_logits(model.llm, embeds, batch.attention_mask, model.answer_ids)
        full = full_vocabulary_yes_no(model.llm, embeds, batch.attention_mask, model.answer_ids)
    torch.testing.assert_close(two_rows, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("generator", ["ours", "published"])
def test_cora_with_zero_b_scores_as_the_base_model(generator, tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    if generator == "ours":
        path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint)
    else:  # the published generator, without a text LoRA
        path = published_cora_config(tmp_path, tiny_dataset, tiny_llm, mf_checkpoint)
    config, model, rows = build(path)
    batch = first_rows(rows["test"])
    base = load_causal_lm(LLMConfig(path=tiny_llm))
    model.eval()
    with torch.no_grad():
        ours = model.score(batch)
        reference = yes_no_logits(
            base, base.get_input_embeddings()(batch.input_ids), batch.attention_mask, model.answer_ids
        )
    assert all(not b.any() for b in model.cora.lora_b.values())
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cora_reads_the_user_embedding_and_trains_its_generator(
    checkpointing, tiny_llm, tiny_dataset, mf_checkpoint, tmp_path
):
    path = llm_config(
        tmp_path,
        tiny_dataset,
        tiny_llm,
        "cora",
        mf_checkpoint,
        model={"llm": {"path": str(tiny_llm), "gradient_checkpointing": checkpointing}},
    )
    config, model, rows = build(path)
    assert model.llm.is_gradient_checkpointing == checkpointing
    batch = first_rows(rows["train"])
    one_step(model, batch)
    assert any(b.abs().sum() > 0 for b in model.cora.lora_b.values())
    # A second backward (B is no longer zero): gradients reach the generator through every target.
    model.train()
    model(batch).backward()
    generator_grads = [p.grad for p in model.cora.generator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in generator_grads)
    assert sum(g.abs().sum() for g in generator_grads) > 0
    assert_cora_reads_the_user_vector(model, batch)  # only rows of that user move


def test_collm_places_projected_embeddings_at_the_slots(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    config, model, rows = build(llm_config(tmp_path, tiny_dataset, tiny_llm, "collm", mf_checkpoint))
    batch = first_rows(rows["train"])
    one_step(model, batch)
    model.eval()
    with torch.no_grad():
        embeds = model.prepare_inputs(batch)
        user, item = model.collab_embeddings(batch.rating)
        index = torch.arange(len(batch))
        torch.testing.assert_close(embeds[index, batch.user_slot], model.projector.user(user))
        torch.testing.assert_close(embeds[index, batch.item_slot], model.projector.item(item))
        before = model.score(batch)
        model.collab.item_embedding.weight[batch.rating.iid[0]] += 1.0
        assert (model.score(batch) - before)[0].abs() > 1e-6


def test_save_then_load_reproduces_scores(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint)
    config, model, rows = build(path)
    one_step(model, first_rows(rows["train"]))
    model.save_weights(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text(dump_config(config))  # as a run's checkpoint holds it
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"adapter", "collab_modules.safetensors", "config.yaml"}
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    _, fresh, _ = build(path)
    batch = first_rows(rows["test"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(model.score(batch), fresh.score(batch))
        fresh.load_weights(tmp_path / "ckpt")
        assert torch.equal(model.score(batch), fresh.score(batch))
    # A checkpoint of another shape is refused by name.
    _, other, _ = build(path, ["model.cora.rank=4"])
    with pytest.raises(DiffRecError, match="checkpoint has model.cora"):
        other.load_weights(tmp_path / "ckpt")


def test_collaborative_checkpoint_must_exist_and_match(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    missing = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", tmp_path / "nowhere")
    assert main(["train", "--cfg-path", str(missing)]) == 2
    assert "checkpoint file missing" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run folder for a run that cannot start
    other = tmp_path / "other-mf"
    shutil.copytree(mf_checkpoint, other)
    info = json.loads((other / "config.json").read_text())
    info["n_users"] += 5
    (other / "config.json").write_text(json.dumps(info))
    mismatched = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", other)
    assert main(["train", "--cfg-path", str(mismatched)]) == 2
    assert (
        f"checkpoint has n_users={info['n_users']} but the dataset has {info['n_users'] - 5}" in capsys.readouterr().err
    )


def test_mode_and_collab_must_agree(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "tallrec", model={"collab": {"ckpt": str(mf_checkpoint)}})
    assert main(["train", "--cfg-path", str(path)]) == 2
    assert "mode tallrec is text only" in capsys.readouterr().err
    path = llm_config(
        tmp_path,
        tiny_dataset,
        tiny_llm,
        "cora",
        mf_checkpoint,
        model={"prompt": {"template": str(PROMPTS / "collm_movie.txt")}},
    )
    assert main(["train", "--cfg-path", str(path)]) == 2
    assert "are filled only in mode collm" in capsys.readouterr().err


# --- training, evaluation, resume, reply ------------------------------------------------------------


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["tallrec", "collm", "cora"])
def test_train_then_evaluate_the_checkpoint(mode, tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, mode, mf_checkpoint)
    assert main(["train", "--cfg-path", str(path)]) == 0
    trained = last_json_line(capsys.readouterr().out)
    run_dir = Path(trained["run_dir"])
    assert trained["model"] == f"llmrec/{mode}" and trained["steps_run"] == 4
    # samples/s is 4 steps of 8 rows over the loop less its evaluations (seconds rounded to milliseconds)
    training_seconds = trained["train_seconds"] - trained["evaluation_seconds"]
    assert trained["train_samples_per_second"] * training_seconds == pytest.approx(4 * 8, rel=0.05)
    assert [point["step"] for point in json.loads((run_dir / "metrics.json").read_text())["curve"]] == [2, 4]
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best", "last"}
    assert {p.name for p in (run_dir / "checkpoints" / "last").iterdir()} >= {
        "adapter",
        "config.yaml",
        "optimizer.bin",
        "custom_checkpoint_0.pkl",  # the learning-rate schedule
        "random_states_0.pkl",
        TRAINER_STATE,
    }
    assert trained["test"]["n"] == 48 == trained["test_warm"]["n"] + trained["test_cold"]["n"]
    best = run_dir / "checkpoints" / "best"
    assert main(["evaluate", "--cfg-path", str(path), "--options", f"run.ckpt={best}"]) == 0
    evaluated = last_json_line(capsys.readouterr().out)
    for split in ("valid", "test", "test_warm", "test_cold"):
        assert evaluated[split] == trained[split]


def test_collm_entry_point_trains_the_llm(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    path = llm_config(
        tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint, run={"max_steps": 1, "eval_every_steps": 1}
    )
    done = subprocess.run(
        [sys.executable, "train_collm_mf_din.py", f"--cfg-path={path}"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert last_json_line(done.stdout)["model"] == "llmrec/cora"


def test_another_checkpoint_gives_other_scores(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    path = llm_config(
        tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint, run={"eval_every_steps": 1, "patience": 1, "lr": 0.05}
    )
    assert main(["train", "--cfg-path", str(path), "--options", "run.max_steps=2"]) == 0
    first = Path(last_json_line(capsys.readouterr().out)["run_dir"]) / "checkpoints" / "last"
    assert main(["train", "--cfg-path", str(path), "--options", "run.max_steps=2", "run.seed=7"]) == 0
    second = Path(last_json_line(capsys.readouterr().out)["run_dir"]) / "checkpoints" / "last"
    config, model, rows = build(path)
    batch = first_rows(rows["test"])
    model.eval()
    scores = []
    for checkpoint in (first, second):
        model.load_weights(checkpoint)
        with torch.no_grad():
            scores.append(model.score(batch))
    assert not torch.allclose(scores[0], scores[1])


def test_resume_continues_where_the_checkpoint_left_off(
    tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys, monkeypatch
):
    path = llm_config(
        tmp_path,
        tiny_dataset,
        tiny_llm,
        "cora",
        mf_checkpoint,
        run={"max_steps": 6, "eval_every_steps": 2, "warmup_steps": 2, "patience": 9},
    )
    original = Engine.save_checkpoint

    def keep_step_four(self, folder, progress):
        original(self, folder, progress)
        if progress["step"] == 4:
            shutil.copytree(folder.parent, tmp_path / "at4")

    monkeypatch.setattr(Engine, "save_checkpoint", keep_step_four)
    assert main(["train", "--cfg-path", str(path)]) == 0
    straight = last_json_line(capsys.readouterr().out)
    resume = tmp_path / "at4" / "last"
    assert json.loads((resume / TRAINER_STATE).read_text())["step"] == 4
    assert main(["train", "--cfg-path", str(path), "--options", f"run.resume_from={resume}"]) == 0
    resumed = last_json_line(capsys.readouterr().out)
    curve = json.loads((Path(resumed["run_dir"]) / "metrics.json").read_text())["curve"]
    assert resumed["steps_run"] == 6 and [point["step"] for point in curve] == [2, 4, 6]
    for split in ("valid", "test"):
        assert resumed[split] == pytest.approx(straight[split], abs=1e-6)
    # the reported figures are the best checkpoint's, which may predate the resume: the last weights must agree too
    ends = [Path(run["run_dir"]) / "checkpoints" / "last" for run in (straight, resumed)]
    files = sorted(path.relative_to(ends[0]) for path in ends[0].rglob("*.safetensors"))
    assert files and files == sorted(path.relative_to(ends[1]) for path in ends[1].rglob("*.safetensors"))
    for name in files:
        want, got = load_file(ends[0] / name), load_file(ends[1] / name)
        assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want), name
    assert resumed["evaluation_seconds"] > 0
    # A checkpoint written before evaluations were timed resumes too; their share is then unknown, not zero.
    state = json.loads((resume / TRAINER_STATE).read_text())
    del state["evaluation_seconds"]
    (resume / TRAINER_STATE).write_text(json.dumps(state))
    assert main(["train", "--cfg-path", str(path), "--options", f"run.resume_from={resume}"]) == 0
    untimed = last_json_line(capsys.readouterr().out)
    assert untimed["evaluation_seconds"] is None and untimed["train_samples_per_second"] is None
    assert untimed["test"] == pytest.approx(straight["test"], abs=1e-6)


def test_reply_is_seeded_and_uses_the_checkpoint(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint)
    assert main(["train", "--cfg-path", str(path), "--options", "run.max_steps=2"]) == 0
    best = Path(last_json_line(capsys.readouterr().out)["run_dir"]) / "checkpoints" / "best"
    command = ["reply", "--cfg-path", str(path), "--user", "3", "--item", "5", "--options", f"run.ckpt={best}"]
    assert main(command) == 0
    first = last_json_line(capsys.readouterr().out)
    assert main(command) == 0
    assert last_json_line(capsys.readouterr().out) == first
    assert (
        first["user"] == 3
        and first["item"] == 5
        and first["reply"]
        and first["prompt"].startswith("<|im_start|>system")
        and first["prompt"].rstrip().endswith("<|im_start|>assistant")
    )  # SmolLM2's chat template
    assert main(["reply", "--cfg-path", str(path), "--user", "3", "--item", "5"]) == 2
    assert "run.ckpt is not set" in capsys.readouterr().err
    assert main([*command[:3], "--user", "999", "--item", "5", "--options", f"run.ckpt={best}"]) == 2
    assert "--user 999 is not a user id" in capsys.readouterr().err


def test_non_finite_gradient_norm_stops_the_llm_training(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, monkeypatch):
    real = training_llm.build_llm_recommender

    def poisoned(*args, **kwargs):
        model, tokenizer, template = real(*args, **kwargs)
        next(param for param in model.parameters() if param.requires_grad).register_hook(
            lambda grad: grad * float("inf")
        )
        return model, tokenizer, template

    monkeypatch.setattr(training_llm, "build_llm_recommender", poisoned)
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint)
    with pytest.raises(
        DiffRecError,
        match=r"gradient norm became (inf|nan) at epoch 1, step 0; training stopped, the best checkpoint so far is kept at \(none yet\)",
    ):
        training_llm.train_llm(load_config(path, ["run.max_steps=2"]))


def test_resume_from_latest_continues_the_newest_run(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    """Of two finished runs under run.output_dir, ``latest`` continues the newer (its curve, not the older's)."""
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint)
    older = training_llm.train_llm(load_config(path, ["run.max_steps=2", "run.seed=1"]))
    newer = training_llm.train_llm(load_config(path, ["run.max_steps=2"]))
    assert older["curve"][0]["loss"] != newer["curve"][0]["loss"]  # the two runs are told apart by their curves
    resumed = training_llm.train_llm(load_config(path, ["run.max_steps=4", "run.resume_from=latest"]))
    assert [point["step"] for point in resumed["curve"]] == [2, 4] and resumed["curve"][0] == newer["curve"][0]
    with pytest.raises(
        DiffRecError, match="run.resume_from is latest but no run under .* holds a complete checkpoints/last"
    ):
        training_llm.train_llm(load_config(path, ["run.resume_from=latest", f"run.output_dir={tmp_path / 'empty'}"]))


@pytest.mark.parametrize("mode", ["tallrec", "collm"])
def test_shared_prefix_scoring_equals_whole_prompts(mode, tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    """One user's prompts for several items: running their common beginning once gives the same scores."""
    from minigpt4.llm.recommender import prompt_rows

    collab = mf_checkpoint if mode == "collm" else None
    config, model, rows = build(llm_config(tmp_path, tiny_dataset, tiny_llm, mode, collab))
    one_step(model, first_rows(rows["train"]))  # a trained LoRA (and projector) is part of both computations
    model.eval()
    dataset = load_rating_dataset(tiny_dataset)
    row = dataset.splits["test"].iloc[[0]]
    frame = row.loc[row.index.repeat(6)].reset_index(drop=True)
    titles = dataset.items.set_index("iid")["title"]
    frame["iid"] = range(1, 7)
    frame["title"] = [titles[i] + " (longer)" * (i % 3) for i in range(1, 7)]  # suffixes of different lengths
    template = PromptTemplate.load(config.model.prompt.template)
    prompts = prompt_rows(
        frame,
        config.model,
        template,
        load_tokenizer(config.model.llm),
        model.collab.max_history if model.collab else 0,
        "test",
    )
    batch = prompts.__getitems__(list(range(6)))
    prefix = shared_prefix_length(prompts.input_ids)
    assert prefix > 10 and batch.attention_mask.sum(1).unique().numel() > 1
    with torch.no_grad():
        torch.testing.assert_close(model.score_shared_prefix(batch, prefix), model.score(batch), rtol=1e-4, atol=1e-4)


def test_cora_refuses_a_shared_prefix(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    config, model, rows = build(llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint))
    assert not model.shares_prefixes
    with pytest.raises(DiffRecError, match="CoRA's per-sample weights"):
        model.score_shared_prefix(first_rows(rows["test"]), 4)


# --- CoRA's published generator and CoLLM's published recipe ---------------------------------------------

PUBLISHED_CORA = {
    "rank": 8,
    "alpha": 16,
    "generator": "published",
    "queries": 4,
    "layers": 2,
    "qformer_heads": 2,
    "ffn": 32,
}


def published_cora_config(tmp_path, tiny_dataset, tiny_llm, mf_checkpoint) -> Path:
    """A cora config with the published generator and no model.lora section (so no text LoRA)."""
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "cora", mf_checkpoint, model={"cora": PUBLISHED_CORA})
    data = yaml.safe_load(path.read_text())
    del data["model"]["lora"]
    path.write_text(yaml.safe_dump(data))
    return path


def test_published_generator_writes_a_unit_norm_a_per_sample(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    config, model, rows = build(published_cora_config(tmp_path, tiny_dataset, tiny_llm, mf_checkpoint))
    model.eval()
    collab = torch.randn(5, 16) * 3
    with torch.no_grad():
        lora_a = model.cora.generator(collab)
    assert lora_a.shape == (5, 8, model.llm.config.hidden_size)
    torch.testing.assert_close(lora_a.flatten(1).norm(dim=1), torch.ones(5))
    assert not torch.allclose(lora_a[0], lora_a[1])  # one A per sample
    assert model.cora.dropout.p == 0.05 and model.cora.fp32  # the published update's dropout and fp32 maths


def test_published_cora_trains_only_the_generator_and_bs(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path):
    config, model, rows = build(published_cora_config(tmp_path, tiny_dataset, tiny_llm, mf_checkpoint))
    assert not config.model.lora.enabled  # CoRA as published: no text LoRA unless model.lora says so
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.startswith(("cora.generator.", "cora.lora_b.")) for name in trainable)
    batch = first_rows(rows["train"])
    one_step(model, batch)
    model.train()
    model(batch).backward()  # B is no longer zero: gradients reach every generator parameter and every B
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    assert all(param.grad.abs().sum() > 0 for param in model.cora.lora_b.values())
    (tmp_path / "with_lora").mkdir()
    kept = llm_config(
        tmp_path / "with_lora", tiny_dataset, tiny_llm, "cora", mf_checkpoint, model={"cora": PUBLISHED_CORA}
    )
    assert load_config(kept).model.lora.enabled  # a model.lora section keeps the text LoRA


def test_published_collm_loads_its_stage1_adapter_frozen(tiny_llm, tiny_dataset, mf_checkpoint, tmp_path, capsys):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}  # TALLRec's stage 1
    for folder in ("stage1", "other", "missing"):
        (tmp_path / folder).mkdir()
    stage1_path = llm_config(tmp_path / "stage1", tiny_dataset, tiny_llm, "tallrec", model={"lora": lora})
    assert main(["train", "--cfg-path", str(stage1_path), "--options", "run.max_steps=2"]) == 0
    stage1 = Path(last_json_line(capsys.readouterr().out)["checkpoint"])
    collm = {"hidden": 32, "recipe": "published", "stage1": str(stage1)}
    path = llm_config(tmp_path, tiny_dataset, tiny_llm, "collm", mf_checkpoint, model={"lora": lora, "collm": collm})
    config, model, rows = build(path)
    saved = load_file(stage1 / "adapter" / "adapter_model.safetensors")
    state = get_peft_model_state_dict(model.llm)
    assert set(state) == set(saved) and all(torch.equal(state[key], saved[key]) for key in saved)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(name.startswith("projector.shared.") for name in trainable)  # one MLP for both sides
    one_step(model, first_rows(rows["train"]))
    after = get_peft_model_state_dict(model.llm)
    assert all(torch.equal(after[key], saved[key]) for key in saved)  # the stage-1 LoRA stays as trained
    other = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    mismatch = llm_config(
        tmp_path / "other", tiny_dataset, tiny_llm, "collm", mf_checkpoint, model={"lora": other, "collm": collm}
    )
    with pytest.raises(DiffRecError, match=r"config.yaml: checkpoint has model.lora"):
        build(mismatch)
    missing = llm_config(
        tmp_path / "missing", tiny_dataset, tiny_llm, "collm", mf_checkpoint, model={"collm": {"recipe": "published"}}
    )
    with pytest.raises(DiffRecError, match="model.collm.recipe published needs model.collm.stage1"):
        load_config(missing)
