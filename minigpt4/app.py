"""``diffrec app``: a Gradio page on a trained run.

Pick a dataset user, or like a few items from a searchable list (a new user, folded in); see their liked
items with pictures, the ranked list with the LLM's and the collaborative model's scores, a reply per item,
and a personalized picture with an instruction box and an alpha slider (0: the instruction alone) to see
what the fusion adds. Every handler turns bad input into a message on the page, never a traceback;
requests run one at a time (Gradio's queue with one worker, and the model's own lock).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from minigpt4.errors import DiffRecError
from minigpt4.serving import DiffRec, GeneratedImage, UserProfile

if TYPE_CHECKING:  # gradio and PIL load with the page, not with the package
    import gradio as gr
    from PIL import Image

logger = logging.getLogger("diffrec")
DATASET_USER, NEW_USER = "A user of the dataset", "A new user (items they liked)"
LIKED_SHOWN = 12
RANKING_COLUMNS = ["rank", "item", "title", "LLM score", "collab score", "collab rank"]


def default_sizes(n_items: int) -> tuple[int, int]:
    """The page's starting K and candidate count: 10 of 50, less for small catalogues."""
    k = min(10, max(1, n_items // 6))
    return k, min(50, max(k, n_items // 3))


def significant(value: float) -> float:
    """A score to four significant digits (a folded-in user's collaborative logits can be small)."""
    return float(f"{value:.4g}")


def message(text: str) -> str:
    """A status line for the page."""
    return f"**{text}**"


class DiffRecApp:
    """The page's handlers over a loaded run; each returns the values of its output components."""

    def __init__(self, served: DiffRec) -> None:
        self.served = served
        items = served.items
        self.item_choices = [(f"{title} [{iid}]", int(iid)) for iid, title in zip(items["iid"], items["title"])]

    def profile(self, who: str, user_id: float | None, liked: Sequence[int] | None) -> UserProfile:
        """The profile the user controls describe."""
        if who == NEW_USER:
            if not liked:
                raise DiffRecError("like at least one item from the list first")
            return self.served.new_user([int(item) for item in liked])
        if user_id is None or float(user_id) != int(user_id):
            raise DiffRecError(f"enter a whole user id between 1 and {self.served.dataset.n_users}")
        return self.served.user(int(user_id))

    def liked_gallery(self, profile: UserProfile) -> list[tuple]:
        """The most recent liked items with their pictures (a grey square when an item has none)."""
        from PIL import Image

        gallery = []
        for item in profile.liked[-LIKED_SHOWN:][::-1]:
            picture = self.served.item_image(item) or Image.new("RGB", (64, 64), (200, 200, 200))
            gallery.append((picture, self.served.title(item)))
        return gallery

    def recommend(
        self,
        who: str,
        user_id: float | None,
        liked: Sequence[int] | None,
        k: float,
        candidates: float,
        replies: bool,
        rerank: str = "llm",
    ) -> tuple:
        """Status, liked gallery, ranking table, replies, the item to draw, and the top item's picture."""
        try:
            profile = self.profile(who, user_id, liked)
            ranking = self.served.recommend(profile, int(k), int(candidates), replies=replies, rerank=rerank)
            table = pd.DataFrame(
                [
                    (rank, r.item, r.title, significant(r.llm_score), significant(r.collab_score), r.collab_rank)
                    for rank, r in enumerate(ranking, 1)
                ],
                columns=RANKING_COLUMNS,
            )
            reply_text = "\n\n".join(f"**{r.title}**: {r.reply}" for r in ranking) if replies else ""
            picture, caption = None, ""
            if self.served.image_model is not None:
                drawn = self.served.image(profile, ranking[0].item)
                picture, caption = shown(drawn.image), describe(drawn)
            who_text = f"user {profile.uid}" if profile.uid else f"a new user with {len(profile.liked)} liked items"
            how = "re-ranked by the LLM" if rerank == "llm" else "by the mean of the LLM and collaborative ranks"
            status = message(
                f"Top {len(ranking)} of {int(candidates)} collaborative candidates for {who_text}, {how}"
                + (" (folded in)" if profile.folded_in else "")
            )
            return status, self.liked_gallery(profile), table, reply_text, ranking[0].item, picture, caption
        except Exception as err:  # noqa: BLE001 - every failure becomes a line on the page
            return failure(err), None, None, "", None, None, ""

    def draw(
        self,
        who: str,
        user_id: float | None,
        liked: Sequence[int] | None,
        item: int | None,
        instruction: str,
        alpha: float,
        learned_gate: bool,
        seed: float | None,
    ) -> tuple:
        """Status, the picture and how it was drawn."""
        try:
            profile = self.profile(who, user_id, liked)
            if seed is None or float(seed) != int(seed):
                raise DiffRecError("the seed must be a whole number")
            drawn = self.served.image(
                profile,
                int(item) if item else None,
                instruction,
                alpha=None if learned_gate else float(alpha),
                seed=int(seed),
            )
            return message("Drawn."), shown(drawn.image), describe(drawn)
        except Exception as err:  # noqa: BLE001
            return failure(err), None, ""


def shown(image: Image.Image) -> Image.Image:
    """A small image scaled up (nearest neighbour) to at least 256 pixels, so a 64-pixel picture is visible."""
    from PIL import Image

    factor = -(-256 // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def describe(drawn: GeneratedImage) -> str:
    """How a picture was drawn, in one line."""
    gate = f"alpha forced to {drawn.alpha:.2f}" if drawn.alpha_forced else f"learned alpha {drawn.alpha:.2f}"
    return f"“{drawn.instruction}”, seed {drawn.seed}, {gate}"


def failure(err: Exception) -> str:
    """The page's one-line message for a failed request (input errors as they are; anything else named)."""
    if isinstance(err, DiffRecError):
        return message(f"Error: {err}")
    logger.exception("app request failed")
    return message(f"Internal error ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'})")


def build_app(served: DiffRec) -> gr.Blocks:
    """The Gradio Blocks page."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    handlers = DiffRecApp(served)
    dataset, config = served.dataset, served.config
    first_user = int(dataset.splits["train"]["uid"].iloc[0])
    generic = served.image_model.config.flow.generic_caption if served.image_model is not None else ""
    with gr.Blocks(title="DiffRec") as page:
        gr.Markdown(
            f"# DiffRec\n{config.model.arch} run on **{dataset.meta.get('name', dataset.root.name)}** ({dataset.n_users} users, {dataset.n_items} items) · checkpoint `{served.checkpoint}`"
        )
        with gr.Row():
            who = gr.Radio([DATASET_USER, NEW_USER], value=DATASET_USER, label="Who", elem_id="who")
            user_id = gr.Number(
                value=first_user, precision=0, label=f"User id (1..{dataset.n_users})", elem_id="user-id"
            )
            liked = gr.Dropdown(
                handlers.item_choices,
                multiselect=True,
                filterable=True,
                label="Items the new user liked (type to search)",
                elem_id="liked",
            )
        with gr.Row():
            start_k, start_candidates = default_sizes(dataset.n_items)
            k = gr.Slider(1, 20, value=start_k, step=1, label="K", elem_id="k")
            candidates = gr.Slider(
                1, 200, value=start_candidates, step=1, label="Collaborative candidates", elem_id="candidates"
            )
            rerank = gr.Radio(
                [("LLM score", "llm"), ("blend of both ranks", "blend")], value="llm", label="Order", elem_id="rerank"
            )
            replies = gr.Checkbox(value=False, label="Write a reply per item", elem_id="replies")
        recommend = gr.Button("Recommend", variant="primary", elem_id="recommend")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(label="Recently liked", columns=6, height=220, elem_id="liked-gallery")
        ranking = gr.Dataframe(headers=RANKING_COLUMNS, label="Recommendations", interactive=False, elem_id="ranking")
        reply_text = gr.Markdown(elem_id="replies-text")
        with gr.Row():
            with gr.Column():
                item = gr.Dropdown(
                    handlers.item_choices, label="Item to picture (optional)", filterable=True, elem_id="draw-item"
                )
                instruction = gr.Textbox(value=generic, label="Instruction", max_lines=2, elem_id="instruction")
                alpha = gr.Slider(0, 1, value=1, step=0.05, label="alpha (0 = the instruction alone)", elem_id="alpha")
                learned = gr.Checkbox(
                    value=True, label="Use the learned gate instead of the slider", elem_id="learned-gate"
                )
                seed = gr.Number(value=config.run.seed, precision=0, label="Seed", elem_id="seed")
                draw = gr.Button("Draw", elem_id="draw")
            with gr.Column():
                picture = gr.Image(label="Personalized picture", type="pil", height=320, elem_id="picture")
                picture_caption = gr.Markdown(elem_id="picture-caption")
        user_inputs = [who, user_id, liked]
        recommend.click(
            handlers.recommend,
            [*user_inputs, k, candidates, replies, rerank],
            [status, gallery, ranking, reply_text, item, picture, picture_caption],
        )
        draw.click(
            handlers.draw, [*user_inputs, item, instruction, alpha, learned, seed], [status, picture, picture_caption]
        )
    return page.queue(default_concurrency_limit=1)


def launch(served: DiffRec, host: str = "127.0.0.1", port: int = 7860, block: bool = False) -> gr.Blocks:
    """Start the page; returns the Blocks (with ``block`` False the server runs in the background)."""
    page = build_app(served)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, quiet=not block)
    return page
