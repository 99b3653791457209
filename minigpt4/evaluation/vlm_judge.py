"""An optional vision-language judge of generated images (a local Hugging Face image-text-to-text model):
consistency, accuracy, integrity and quality, each 0-5, asked for as one JSON object.

The answer parser is strict: it reads the first JSON object in the answer; a criterion that is
absent, not a number or outside 0-5 is missing, and an answer with no JSON object at all counts as
unparseable. Missing values are reported as missing, never replaced by a default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from minigpt4.config import VLMJudgeConfig
from minigpt4.errors import DiffRecError

CRITERIA = ("consistency", "accuracy", "integrity", "quality")
QUESTION = (
    'You judge a generated product image for the request: "{instruction}". Rate it from 0 to 5 on '
    "consistency (matches the request), accuracy (the product is depicted correctly), integrity (no "
    "broken or missing parts) and quality (sharpness, composition). Answer with only a JSON object "
    'like {{"consistency": 3, "accuracy": 4, "integrity": 5, "quality": 2}}.'
)


@dataclass
class Verdict:
    """One judged image: each criterion's score (None when missing) and whether any JSON was found."""

    scores: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(CRITERIA))
    parsed: bool = False
    answer: str = ""


def parse_verdict(answer: str) -> Verdict:
    """Read the first JSON object of an answer; invalid or absent criteria are missing."""
    verdict = Verdict(answer=answer)
    decoder = json.JSONDecoder()
    start = answer.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(answer, start)
        except json.JSONDecodeError:
            start = answer.find("{", start + 1)
            continue
        if isinstance(value, dict):
            verdict.parsed = True
            for name in CRITERIA:
                score = value.get(name)
                valid = (
                    isinstance(score, (int, float))
                    and not isinstance(score, bool)
                    and math.isfinite(score)
                    and 0 <= score <= 5
                )
                verdict.scores[name] = float(score) if valid else None
            return verdict
        start = answer.find("{", start + 1)
    return verdict


def summarize_verdicts(verdicts: list[Verdict]) -> dict:
    """Mean of each criterion over the answers that gave it, with counts of missing and unparseable answers."""
    summary: dict = {"judged": len(verdicts), "unparseable": sum(not v.parsed for v in verdicts)}
    for name in CRITERIA:
        values = [v.scores[name] for v in verdicts if v.scores[name] is not None]
        summary[name] = sum(values) / len(values) if values else None
        summary[f"{name}_missing"] = len(verdicts) - len(values)
    return summary


class VLMJudge:
    """A local image-text-to-text model asked for the four scores of each image."""

    def __init__(self, config: VLMJudgeConfig, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(config.path)
        if not (folder / "config.json").is_file():
            raise DiffRecError(
                f"model.judge.path {folder}: no config.json (expected a Hugging Face image-text-to-text model folder)"
            )
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder).to(device).eval()
        self.max_new_tokens = config.max_new_tokens
        self.name = folder.name

    def judge(self, image: Image.Image, instruction: str) -> Verdict:
        """Ask for the four scores of one image (greedy decoding, so the verdict is reproducible)."""
        import torch

        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(instruction=instruction)}],
            }
        ]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[image], text=prompt, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer = self.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return parse_verdict(answer)
