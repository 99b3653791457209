"""Prompt templates (``prompts/*.txt``) filled from rating-table columns and tokenized, with the
positions of the ``<UserID>``/``<TargetItemID>`` slots that CoLLM fills with projected embeddings."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from transformers import PreTrainedTokenizerBase

from minigpt4.errors import DiffRecError
from minigpt4.io import read_text

# Placeholder -> the rating-table column that fills it.
FIELDS = {"history_titles": "his_title", "target_title": "title", "instruction": "instruction"}
SLOTS = ("<UserID>", "<TargetItemID>")
SLOT_PATTERN = re.compile(r"<\w+>")


@dataclass(frozen=True)
class PromptTemplate:
    """A validated template: its text, the placeholders it fills and the slots it holds."""

    path: Path
    text: str
    fields: tuple[str, ...]
    slots: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> PromptTemplate:
        """Read a template; an unknown placeholder or slot is an error naming it."""
        path = Path(path)
        if not path.is_file():
            raise DiffRecError(f"prompt template not found: {path}")
        text = read_text(path).strip()
        fields = []
        for _, name, spec, conversion in string.Formatter().parse(text):
            if name is None:
                continue
            if name not in FIELDS or spec or conversion:
                raise DiffRecError(
                    f"{path}: unknown placeholder {{{name}}}; known: {', '.join('{' + f + '}' for f in FIELDS)}"
                )
            fields.append(name)
        slots = SLOT_PATTERN.findall(text)
        for slot in slots:
            if slot not in SLOTS:
                raise DiffRecError(f"{path}: unknown slot {slot}; known: {', '.join(SLOTS)}")
        if len(set(slots)) != len(slots):
            raise DiffRecError(f"{path}: each slot may appear once, got {slots}")
        return cls(path, text, tuple(dict.fromkeys(fields)), tuple(slots))

    @property
    def cue(self) -> str:
        """The last line, after which the model answers."""
        return self.text.splitlines()[-1]

    def check_columns(self, frame: pd.DataFrame, where: str) -> None:
        """Every placeholder's column exists and holds a value in every row of ``frame``."""
        for name in self.fields:
            column = FIELDS[name]
            if column not in frame.columns:
                raise DiffRecError(f"{self.path}: placeholder {{{name}}} needs column '{column}', which {where} lacks")
            if column == "his_title":
                continue  # an empty history is a real value ("none")
            values = frame[column]
            empty = values.isna().to_numpy() | (values.astype(str).str.strip() == "").to_numpy()
            if empty.any():
                row = int(np.flatnonzero(empty)[0])
                raise DiffRecError(
                    f"{where}, row {row}: placeholder {{{name}}} is unfilled (column '{column}' is empty)"
                )

    def render(self, values: dict[str, str]) -> list[str]:
        """The filled text, split at the slots: ``len(self.slots) + 1`` pieces."""
        text = self.text.format(**{name: values[name] for name in self.fields})
        return re.split("|".join(re.escape(slot) for slot in self.slots), text) if self.slots else [text]


def history_text(titles: list[str]) -> str:
    """Titles in double quotes, oldest first; ``none`` for an empty history."""
    return ", ".join(f'"{title}"' for title in titles) if len(titles) else "none"


@dataclass
class EncodedPrompts:
    """Token ids per row and, per slot, the token position of that slot in each row (-1 when absent)."""

    input_ids: list[list[int]]
    slot_positions: dict[str, np.ndarray]


def chat_frame(tokenizer: PreTrainedTokenizerBase, prefix: list[int]) -> tuple[str, str]:
    """The text the tokenizer's chat template puts before and after one user message, up to where the
    assistant answers (without a leading BOS when ``prefix``, what the tokenizer adds by itself, is that BOS)."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(marker)
    if (
        tokenizer.bos_token_id is not None
        and prefix[:1] == [tokenizer.bos_token_id]
        and before.startswith(tokenizer.bos_token)
    ):
        before = before[len(tokenizer.bos_token) :]
    return before, after


def encode_prompts(
    template: PromptTemplate,
    frame: pd.DataFrame,
    tokenizer: PreTrainedTokenizerBase,
    max_history: int,
    max_length: int,
    where: str,
    chat: bool = False,
) -> EncodedPrompts:
    """Fill and tokenize one prompt per row; each slot becomes one placeholder token. With ``chat`` the
    filled text is the user's message in the tokenizer's chat template (when it has one)."""
    template.check_columns(frame, where)
    prefix = tokenizer("", add_special_tokens=True).input_ids  # BOS where the model expects one
    before, after = chat_frame(tokenizer, prefix) if chat and tokenizer.chat_template else ("", "")
    slot_token = tokenizer.pad_token_id
    histories = frame["his_title"].tolist() if "history_titles" in template.fields else [[]] * len(frame)
    others = {name: frame[FIELDS[name]].astype(str).tolist() for name in template.fields if name != "history_titles"}
    input_ids: list[list[int]] = []
    positions = {slot: np.full(len(frame), -1, dtype=np.int64) for slot in template.slots}
    for row, history in enumerate(histories):
        keep = min(max_history, len(history))
        while True:
            values = {name: column[row] for name, column in others.items()}
            values["history_titles"] = history_text(list(history[len(history) - keep :]) if keep else [])
            rendered = template.render(values)
            rendered[0] = before + rendered[0]
            rendered[-1] = rendered[-1] + after  # the same piece when the template has no slot
            pieces = tokenizer(rendered, add_special_tokens=False).input_ids
            ids = list(prefix)
            for index, piece in enumerate(pieces):
                if index:
                    positions[template.slots[index - 1]][row] = len(ids)
                    ids.append(slot_token)
                ids.extend(piece)
            if len(ids) <= max_length:
                break
            if keep == 0:
                raise DiffRecError(
                    f"{where}, row {row}: the prompt is {len(ids)} tokens even without history; raise model.llm.max_length ({max_length})"
                )
            keep -= 1  # the oldest title goes first
        input_ids.append(ids)
    return EncodedPrompts(input_ids, positions)
