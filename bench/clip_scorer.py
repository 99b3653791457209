"""The in-domain CLIP scorer: training time, held-out quality, and images scored per second in batches
against one image at a time (the straightforward loop), same scorer and images.

    python bench/clip_scorer.py dataset/ml-100k [--steps 300] [--images 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import emit  # noqa: E402  (bench/measure.py)

from minigpt4.config import ClipConfig  # noqa: E402
from minigpt4.data.contract import load_rating_dataset  # noqa: E402
from minigpt4.data.images import load_image_table  # noqa: E402
from minigpt4.evaluation.clip_score import ClipScorer  # noqa: E402
from minigpt4.training.clip_scorer import train_clip  # noqa: E402


def main() -> None:
    """Train, then time the scoring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    out = ROOT / "runs" / "bench_clip_scorer" / f"clip-{args.dataset.name}"
    metrics = train_clip(args.dataset, out, steps=args.steps)
    emit("float32", figure="scorer_training", **{key: value for key, value in metrics.items() if key != "scorer"})
    data = load_rating_dataset(args.dataset)
    paths = [data.root / path for path in load_image_table(data.root, data.n_items)["path"][: args.images]]
    images = [Image.open(path).convert("RGB") for path in paths]
    scorer = ClipScorer(ClipConfig(path=out))
    scorer.image_features(images[:8])  # warm-up
    seconds = {}
    for name, work in (
        ("batched", lambda: scorer.image_features(images)),
        ("one_at_a_time", lambda: [scorer.image_features([image]) for image in images]),
    ):
        start = time.perf_counter()
        work()
        seconds[name] = time.perf_counter() - start
    emit("float32", figure="images_scored_per_second", images=len(images), batch_size=scorer.batch_size,
         batched=round(len(images) / seconds["batched"], 1), one_at_a_time=round(len(images) / seconds["one_at_a_time"], 1),
         speedup=round(seconds["one_at_a_time"] / seconds["batched"], 2))  # fmt: skip


if __name__ == "__main__":
    main()
