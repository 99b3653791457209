"""Use a trained run for one user: recommend, explain, picture.

``DiffRec.load`` reads once what a run trained — the collaborative model, the LLM with its adapter and
CoRA/CoLLM modules, the image pipeline with its LoRA and fusion — and serves:

- ``recommend(user, k, candidates)``: two stages. The collaborative model scores the whole catalogue
  (the user's seen items masked) and its top ``candidates`` are re-ranked by the LLM's Yes-score; each
  item carries both scores, and on request its reply and image;
- ``reply(user, item)``: the LLM's short personalized reply about an item;
- ``image(user, item, instruction, alpha, seed)``: the personalized image (alpha forces the fusion gate;
  0 is the instruction alone).

A user is a dataset user id, or a new user given as the items they liked (a list of item ids): their
titles fill the prompts, history models read them as the history, and id-based models (MF, LightGCN)
fold them in (``recommenders/fold_in.py``). Dataset users the collaborative model never trained on are
folded in from their liked items the same way. Every call holds one lock: one request at a time per
loaded model.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from PIL import Image

from minigpt4.config import Config, DiffRecConfig, LLMRecConfig, SD3Config, load_config, resolve_precision
from minigpt4.data.contract import RatingDataset, load_rating_dataset
from minigpt4.data.images import IMAGE_TABLE, item_captions, load_image_table, open_image
from minigpt4.data.tensors import RatingBatch, padded_history
from minigpt4.diffrec_model import PREFERENCE_SOURCES, PreferenceSource, build_diffrec, rating_prompts_of
from minigpt4.diffusion.generate import load_for_sampling
from minigpt4.diffusion.personalized import PersonalizedSD3
from minigpt4.diffusion.sampling import generate_images
from minigpt4.errors import DiffRecError
from minigpt4.hardware import configure_threads, placed_devices
from minigpt4.io import read_json
from minigpt4.llm.prompts import PromptTemplate
from minigpt4.llm.recommender import LLMRecommender, build_llm_recommender
from minigpt4.llm.reply import write_replies
from minigpt4.llm.scoring import shared_prefix_length
from minigpt4.logs import quiet_libraries
from minigpt4.recommenders.fold_in import GUEST_UID, GuestUser, fold_in_user, reads_history

MAX_K = 100
MAX_CANDIDATES = 500
MAX_INSTRUCTION_CHARS = 300


@dataclass
class UserProfile:
    """Who is being served: a dataset user id (0 for a new user), their liked items and what they have seen."""

    uid: int
    liked: list[int]  # oldest first: the prompts' history and the history models' input
    seen: set[int]  # never recommended back
    vector: torch.Tensor | None = None  # the folded-in collaborative vector, when the model has none for them

    @property
    def folded_in(self) -> bool:
        """True when the collaborative side reads a folded-in vector."""
        return self.vector is not None

    @property
    def model_uid(self) -> int:
        """The user id the models read: the guest id when folded in (a cold user's own row is untrained)."""
        return GUEST_UID if self.folded_in else self.uid


@dataclass
class GeneratedImage:
    """One personalized image and how it was drawn."""

    image: Image.Image
    instruction: str
    seed: int
    alpha: float  # the fusion gate the image was drawn with
    alpha_forced: bool

    def record(self) -> dict:
        """Everything but the pixels, for JSON."""
        return {
            "instruction": self.instruction,
            "seed": self.seed,
            "alpha": self.alpha,
            "alpha_forced": self.alpha_forced,
        }


@dataclass
class Recommendation:
    """One recommended item with the collaborative score, the LLM's Yes-score and its rank in each."""

    item: int
    title: str
    collab_score: float
    llm_score: float
    collab_rank: int  # 1-based rank among the collaborative candidates
    reply: str | None = None
    image: GeneratedImage | None = None
    extra: dict = field(default_factory=dict)  # e.g. the file an image was written to

    def record(self) -> dict:
        """The JSON form (an image as its record, plus ``extra``)."""
        out = {
            "item": self.item,
            "title": self.title,
            "collab_score": self.collab_score,
            "llm_score": self.llm_score,
            "collab_rank": self.collab_rank,
        }
        if self.reply is not None:
            out["reply"] = self.reply
        if self.image is not None:
            out["image"] = self.image.record()
        return {**out, **self.extra}


User = int | Sequence[int] | UserProfile  # a dataset user id, a new user's liked item ids, or a built profile


class DiffRec:
    """A trained run, loaded once, serving recommendations, replies and images."""

    def __init__(
        self,
        config: Config,
        checkpoint: Path,
        dataset: RatingDataset,
        rec: LLMRecommender | None,
        tokenizer,
        template: PromptTemplate | None,
        image: PersonalizedSD3 | None,
        preference: PreferenceSource = PREFERENCE_SOURCES["collab"],
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.dataset = dataset
        self.rec = rec
        self.tokenizer = tokenizer
        self.template = template
        self.image_model = image
        self.preference = preference  # where the image side reads the user from
        self.items = dataset.items.set_index("iid", drop=False).sort_index()
        images = load_image_table(dataset.root, dataset.n_items) if (dataset.root / IMAGE_TABLE).is_file() else None
        self.item_paths = images.set_index("iid")["path"] if images is not None else None  # item id -> picture file
        self.lock = threading.Lock()
        self.guests = _install_guests(rec, image)
        collab = rec.collab if rec is not None else image.collab if image is not None else None
        self.collab: GuestUser | None = collab
        all_rows = pd.concat([frame.assign(split=name) for name, frame in dataset.splits.items()], ignore_index=True)
        self._rows_by_user = {
            int(uid): rows.sort_values("timestamp", kind="stable") for uid, rows in all_rows.groupby("uid")
        }
        self._trained_users = set(dataset.splits["train"]["uid"].unique().tolist())
        self._instruction = all_rows["instruction"].mode().iloc[0] if "instruction" in all_rows.columns else None

    @property
    def rec_config(self) -> LLMRecConfig:
        """The LLM recommender's model section."""
        model = self.config.model
        return model.rec if isinstance(model, DiffRecConfig) else model

    # Loading.

    @classmethod
    def load(cls, source: str | Path, options: Sequence[str] = ()) -> DiffRec:
        """A run from its config file (checkpoint: ``run.ckpt``, else the latest run's under ``run.output_dir``),
        its run folder, its output folder (with ``latest``) or one of its checkpoint folders."""
        config, checkpoint = resolve_run(Path(source), list(options))
        configure_threads()
        quiet_libraries()
        dataset = load_rating_dataset(config.datasets.path)
        model = config.model
        llm_device, image_device = placed_devices(config.run.devices, config.run.cpu, PartialState(cpu=config.run.cpu))
        resolve_precision(config, llm_device, image_device)
        if isinstance(model, DiffRecConfig):
            joint = build_diffrec(model, dataset, (llm_device, image_device))
            joint.load_weights(checkpoint)
            return cls(
                config,
                checkpoint,
                dataset,
                joint.rec,
                joint.tokenizer,
                joint.template,
                joint.image,
                joint.source,
            )
        if isinstance(model, LLMRecConfig):
            rec, tokenizer, template = build_llm_recommender(model, dataset, llm_device)
            rec.load_weights(checkpoint)
            return cls(config, checkpoint, dataset, rec, tokenizer, template, None)
        if isinstance(model, SD3Config):
            config.run.ckpt = checkpoint
            return cls(config, checkpoint, dataset, None, None, None, load_for_sampling(config, dataset, image_device))
        raise DiffRecError(
            f"{source}: model.arch {model.arch} is a collaborative model; serve a diffrec, llmrec or sd3 run"
        )

    def precision(self) -> str:
        """The dtypes the run is served in, on one line (what benchmarks record)."""
        parts = []
        if self.rec is not None:
            parts.append(f"llm {self.rec_config.llm.dtype}")
        if self.image_model is not None:
            parts.append(f"pipeline {self.image_model.config.pipeline.dtype}")
        mixed = self.config.run.mixed_precision
        return ", ".join(parts + ([f"{mixed} autocast"] if mixed != "no" else []))

    # Users.

    def user(self, uid: int, splits: Sequence[str] = ("train", "valid", "test")) -> UserProfile:
        """A dataset user from their rows in ``splits`` (liked items in time order; every rated item is seen);
        folded in from those likes when the collaborative model never trained on them."""
        if isinstance(uid, bool) or not isinstance(uid, (int, np.integer)) or not 1 <= uid <= self.dataset.n_users:
            raise DiffRecError(f"unknown user {uid!r}: {self.dataset.root} has users 1..{self.dataset.n_users}")
        rows = self._rows_by_user.get(int(uid))
        if rows is None:
            raise DiffRecError(f"user {uid} has no rows in {self.dataset.root}; give their liked items as a new user")
        rows = rows[rows["split"].isin(list(splits))]
        liked = list(dict.fromkeys(int(iid) for iid in rows.loc[rows["label"] == 1, "iid"]))
        profile = UserProfile(int(uid), liked, set(rows["iid"].astype(int).tolist()))
        if int(uid) not in self._trained_users:
            profile.vector = self._fold_in(liked)
        return profile

    def new_user(self, liked: Sequence[int]) -> UserProfile:
        """A user outside the dataset who liked ``liked`` (item ids, oldest first)."""
        items = self.check_items(liked, "liked")
        if not items:
            raise DiffRecError("a new user needs at least one liked item id")
        return UserProfile(GUEST_UID, items, set(items), self._fold_in(items))

    def profile(self, user: User) -> UserProfile:
        """A profile from a dataset user id, a new user's liked item ids, or a profile."""
        if isinstance(user, UserProfile):
            return user
        if isinstance(user, (int, np.integer)) and not isinstance(user, bool):
            return self.user(int(user))
        if isinstance(user, Sequence) and not isinstance(user, str):
            return self.new_user(user)
        raise DiffRecError(f"a user is a user id or a list of liked item ids, not {user!r}")

    def check_items(self, items: Sequence, what: str) -> list[int]:
        """``items`` as catalogue item ids, in order, without repeats; anything else is an error naming it."""
        out = []
        for item in items:
            if (
                isinstance(item, bool)
                or not isinstance(item, (int, np.integer))
                or not 1 <= item <= self.dataset.n_items
            ):
                raise DiffRecError(
                    f"{what}: {item!r} is not an item id of {self.dataset.root} (1..{self.dataset.n_items})"
                )
            out.append(int(item))
        return list(dict.fromkeys(out))

    def title(self, item: int) -> str:
        """An item's title."""
        return str(self.items.at[self.check_items([item], "item")[0], "title"])

    def item_image(self, item: int) -> Image.Image | None:
        """The item's own picture from the dataset's images table, when it has one."""
        if self.item_paths is None or item not in self.item_paths.index:
            return None
        return open_image(self.dataset.root / self.item_paths[item])

    # Scores.

    @torch.no_grad()
    def collab_scores(self, user: User) -> torch.Tensor:
        """The collaborative model's logit for every item, [n_items] (item id i at position i - 1)."""
        profile = self.profile(user)
        if self.collab is None:
            raise DiffRecError("this run has no collaborative model (model.rec.collab): it cannot rank the catalogue")
        n = self.dataset.n_items
        device = _device_of(self.collab)
        history = torch.as_tensor(
            padded_history(pd.Series([profile.liked]), self.collab.max_history), device=device
        ).expand(n, -1)
        iid = torch.arange(1, n + 1, device=device)
        batch = RatingBatch(
            rows=iid - 1,
            uid=torch.full_like(iid, profile.model_uid),
            iid=iid,
            label=torch.zeros(n, device=device),
            his=history,
        )
        with self._serving(profile, autocast=False):  # fp32: cheap, and no ties from bf16 rounding
            return self.collab.score(batch).float().cpu()

    def candidates(self, user: User, count: int) -> tuple[list[int], torch.Tensor]:
        """The collaborative model's top ``count`` unseen items, best first, and their scores."""
        profile = self.profile(user)
        scores = self.collab_scores(profile)
        if profile.seen:
            scores[torch.as_tensor(sorted(profile.seen)) - 1] = -torch.inf
        top = torch.topk(scores, count)
        return (top.indices + 1).tolist(), top.values

    @torch.no_grad()
    def llm_scores(self, user: User, items: Sequence[int], shared_prefix: bool | None = None) -> torch.Tensor:
        """The LLM's Yes-score (log P(Yes) - log P(No)) for each item, [len(items)], ``run.eval_batch_size``
        prompts per forward pass. The prompts' common beginning (the user's part) runs once per batch where
        the mode allows it (TALLRec, CoLLM; ``shared_prefix`` None: whenever it does)."""
        profile, rec = self.profile(user), self._require_rec("scoring items")
        items = self.check_items(items, "items")
        prompts = rating_prompts_of(rec, self.template, self.tokenizer, "recommend")(self.rating_rows(profile, items))
        if shared_prefix is None:
            shared_prefix = rec.shares_prefixes
        prefix = shared_prefix_length(prompts.input_ids) if shared_prefix else 0
        size = self.config.run.eval_batch_size
        scores = []
        with self._serving(profile):
            for start in range(0, len(items), size):
                batch = prompts.__getitems__(list(range(start, min(start + size, len(items))))).to(rec.llm.device)
                scores.append(
                    (rec.score_shared_prefix(batch, prefix) if prefix > 0 else rec.score(batch)).float().cpu()
                )
        return torch.cat(scores)

    # What a user sees.

    def recommend(
        self,
        user: User,
        k: int = 10,
        candidates: int = 50,
        replies: bool = False,
        images: bool = False,
        instruction: str | None = None,
        seed: int | None = None,
        rerank: str = "llm",
    ) -> list[Recommendation]:
        """The top ``k`` of the collaborative model's top ``candidates`` unseen items re-ranked by the LLM's
        Yes-score (``rerank="blend"``: by the mean of the two ranks); with ``replies`` / ``images`` each
        carries its reply and its image (drawn for ``instruction``, default each item's caption)."""
        profile = self.profile(user)
        self._require_rec("recommend")
        unseen = self.dataset.n_items - len(profile.seen)
        for name, value, upper in (
            ("k", k, min(MAX_K, unseen)),
            ("candidates", candidates, min(MAX_CANDIDATES, unseen)),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
                raise DiffRecError(f"{name} must be an integer in 1..{upper} for this user, got {value!r}")
        if candidates < k:
            raise DiffRecError(f"candidates ({candidates}) must be at least k ({k})")
        if rerank not in RERANK_ORDERS:
            raise DiffRecError(f"rerank must be one of {', '.join(RERANK_ORDERS)}, got {rerank!r}")
        if instruction is not None:
            instruction = check_instruction(instruction)
        pool, collab = self.candidates(profile, candidates)
        llm = self.llm_scores(profile, pool)
        order = rerank_order(llm, rerank)[:k].tolist()
        out = [
            Recommendation(pool[i], str(self.items.at[pool[i], "title"]), float(collab[i]), float(llm[i]), i + 1)
            for i in order
        ]
        for entry in out:
            if replies:
                entry.reply = self.reply(profile, entry.item, seed)
            if images:
                entry.image = self.image(profile, entry.item, instruction, seed=seed)
        return out

    def reply(self, user: User, item: int, seed: int | None = None) -> str:
        """The LLM's short personalized reply about ``item`` (seeded: the same seed, the same reply)."""
        profile, rec = self.profile(user), self._require_rec("reply")
        row = self.rating_rows(profile, self.check_items([item], "item"))
        seed = self.config.run.seed if seed is None else check_seed(seed)
        with self._serving(profile):
            return write_replies(rec, self.tokenizer, self.rec_config, seed, row)[0]["reply"]

    def image(
        self,
        user: User,
        item: int | None = None,
        instruction: str | None = None,
        alpha: float | None = None,
        seed: int | None = None,
    ) -> GeneratedImage:
        """The personalized image for ``instruction`` (default: the item's caption, or the generic one without
        an item); ``alpha`` forces the fusion gate (0: the instruction alone, 1: the full preference)."""
        profile = self.profile(user)
        model = self.image_model
        if model is None:
            raise DiffRecError(
                f"this run ({self.config.model.arch}) has no image model: images need a diffrec or sd3 run"
            )
        image_config = model.config
        items = self.check_items([item], "item") if item is not None else []
        if instruction is None:
            instruction = (
                item_captions(image_config.flow.caption, self.dataset.items, items)[0]
                if items
                else image_config.flow.generic_caption
            )
        instruction = check_instruction(instruction)
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1
        ):
            raise DiffRecError(f"alpha must be a number in 0..1, got {alpha!r}")
        seed = self.config.run.seed if seed is None else check_seed(seed)
        # The preference row's target: the item, or without one the user's latest liked item (what the LLM's preference reads).
        target = items or profile.liked[-1:] or [1]
        row = self.rating_rows(profile, target)
        override = alpha if alpha is not None else image_config.fusion.alpha_override
        with self._serving(profile):
            preference = self._image_preference(profile, row, model)
            generated, gate = generate_images(model, preference, [instruction], [seed], image_config.sampling, override)
        return GeneratedImage(generated[0], instruction, seed, float(gate[0]), override is not None)

    # Internals.

    def _fold_in(self, liked: list[int]) -> torch.Tensor | None:
        """The folded-in vector for id-based collaborative models; None for history models."""
        if self.collab is None or reads_history(self.collab.model):
            return None
        return fold_in_user(self.collab.model, liked)

    def rating_rows(self, profile: UserProfile, items: list[int]) -> pd.DataFrame:
        """Rating-table rows of the profile's user and history for ``items`` (what prompts and models read)."""
        history = np.asarray(profile.liked, dtype=np.int64)
        titles = [str(title) for title in self.items.loc[profile.liked, "title"]] if profile.liked else []
        frame = pd.DataFrame({
            "uid": profile.model_uid, "iid": items, "label": 0, "his": [history] * len(items), "his_title": [titles] * len(items),
            "title": [str(title) for title in self.items.loc[items, "title"]], "not_cold": int(not profile.folded_in),
        })  # fmt: skip
        if self._instruction is not None:
            rows = self._rows_by_user.get(profile.uid)
            frame["instruction"] = rows["instruction"].iloc[-1] if rows is not None else self._instruction
        return frame

    def _image_preference(self, profile: UserProfile, row: pd.DataFrame, model: PersonalizedSD3) -> torch.Tensor:
        """The image side's user vector, from the run's preference source."""
        prompts_of = rating_prompts_of(self.rec, self.template, self.tokenizer, "image preference")
        return self.preference.row_vectors(self.rec, model, prompts_of, row)

    def _require_rec(self, what: str) -> LLMRecommender:
        """The LLM recommender, or an error saying this run has none."""
        if self.rec is None:
            raise DiffRecError(
                f"this run ({self.config.model.arch}) has no LLM recommender: {what} needs a diffrec or llmrec run"
            )
        return self.rec

    @contextlib.contextmanager
    def _serving(self, profile: UserProfile, autocast: bool = True) -> Iterator[None]:
        """One request at a time: the profile's folded-in vector in place, eval mode, the run's autocast
        (unless ``autocast`` is False)."""
        with self.lock:
            for guest in self.guests:
                guest.vector = profile.vector
            try:
                for module in (self.rec, self.image_model):
                    if module is not None:
                        module.eval()
                device = self.rec.llm.device if self.rec is not None else self.image_model.transformer.device
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=autocast and self.config.run.mixed_precision == "bf16"
                ):
                    yield
            finally:
                for guest in self.guests:
                    guest.vector = None


RERANK_ORDERS = ("llm", "blend")


def rerank_order(llm: torch.Tensor, rerank: str) -> torch.Tensor:
    """Positions of candidates (given best-first by the collaborative model) in the served order: by the
    LLM's score, or (``blend``) by the mean of the collaborative and the LLM rank; ties keep the
    collaborative order."""
    by_llm = torch.argsort(llm, descending=True, stable=True)
    if rerank == "llm":
        return by_llm
    llm_rank = torch.empty_like(by_llm)
    llm_rank[by_llm] = torch.arange(len(llm))
    return torch.argsort(llm_rank + torch.arange(len(llm)), stable=True)


def _install_guests(rec: LLMRecommender | None, image: PersonalizedSD3 | None) -> list[GuestUser]:
    """Wrap every collaborative model the run reads in a ``GuestUser`` (one wrapper per distinct model)."""
    guests: dict[int, GuestUser] = {}

    def wrap(model):
        if model is None:
            return None
        if id(model) not in guests:
            guests[id(model)] = GuestUser(model)
        return guests[id(model)]

    if rec is not None:
        original = rec.collab
        rec.collab = wrap(original)
        if image is not None and image.collab is original:
            image.collab = rec.collab
    if image is not None and not isinstance(image.collab, GuestUser):
        image.collab = wrap(image.collab)
    return list(guests.values())


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's first parameter or buffer lives."""
    return next(module.buffers(), next(module.parameters())).device


def check_instruction(text: object) -> str:
    """A drawing instruction: non-empty text of at most ``MAX_INSTRUCTION_CHARS`` characters."""
    if not isinstance(text, str) or not text.strip():
        raise DiffRecError(
            "the instruction is empty: say what to draw, e.g. 'a poster for a quiet science-fiction film'"
        )
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise DiffRecError(f"the instruction is {len(text)} characters; at most {MAX_INSTRUCTION_CHARS}")
    return text.strip()


def check_seed(seed: object) -> int:
    """A sampling seed: a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DiffRecError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def resolve_run(source: Path, options: list[str]) -> tuple[Config, Path]:
    """The config and checkpoint folder a source names (see ``DiffRec.load``)."""
    if source.is_file():
        config = load_config(source, options)
        if config.run.ckpt is not None:
            return config, _checked_checkpoint(config.run.ckpt)
        return config, run_checkpoint(config.run.output_dir / "latest")
    if not source.is_dir():
        raise DiffRecError(f"{source}: not found (give a run's config file, run folder or checkpoint folder)")
    if (source / "latest").is_dir() and not (source / "config.yaml").is_file():
        source = source / "latest"
    if (source / "checkpoints").is_dir():
        return load_config(source / "config.yaml", options), run_checkpoint(source)
    if source.parent.name == "checkpoints":
        return load_config(source.parent.parent / "config.yaml", options), _checked_checkpoint(source)
    raise DiffRecError(
        f"{source}: neither a run folder (config.yaml, checkpoints/) nor one of its checkpoints/ folders"
    )


def run_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a finished run reported in its ``metrics.json``."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise DiffRecError(
            f"{path}: missing; the run has not finished (serve one of its checkpoints with run.ckpt=...)"
        )
    checkpoint = read_json(path, dict).get("checkpoint")
    if not isinstance(checkpoint, str):
        raise DiffRecError(f"{path}: has no 'checkpoint' entry (serve one of its checkpoints with run.ckpt=...)")
    return _checked_checkpoint(Path(checkpoint))


def _checked_checkpoint(folder: Path) -> Path:
    """A checkpoint folder that exists."""
    if not folder.is_dir():
        raise DiffRecError(f"checkpoint folder not found: {folder}")
    return folder
