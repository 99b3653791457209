"""The ``diffrec`` command: data preparation, collaborative pre-training, LLM and image training, evaluation,
replies, personalized images and the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minigpt4.errors import DiffRecError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit code 2), like every other user error."""

    def error(self, message: str) -> None:
        """Print ``prog: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _config_args(parser: argparse.ArgumentParser) -> None:
    """--cfg-path and --options, as in CoLLM/LAVIS."""
    parser.add_argument("--cfg-path", required=True, type=Path, help="YAML config file")
    parser.add_argument("--options", nargs="*", default=[], help="overrides, e.g. run.lr=0.01 model.embedding_size=64")


def _serving_args(parser: argparse.ArgumentParser) -> None:
    """The run to serve: a config file (its run.ckpt, else its latest run), a run folder or a checkpoint folder."""
    parser.add_argument(
        "--cfg-path", required=True, type=Path, help="the run's config file, run folder or checkpoint folder"
    )
    parser.add_argument(
        "--options", nargs="*", default=[], help="overrides, e.g. run.ckpt=runs/x/latest/checkpoints/best run.cpu=true"
    )


def _item_ids(text: str) -> list[int]:
    """``1,5,9`` as a list of ints (argparse turns the ValueError into a one-line usage error)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected item ids separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """All subcommands."""
    parser = OneLineParser(prog="diffrec", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    data = commands.add_parser("data", help="prepare or import datasets into the contract's Parquet folders")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=OneLineParser)
    prepare = data_commands.add_parser("prepare", help="build a dataset from raw files")
    sources = prepare.add_subparsers(dest="source", required=True, parser_class=OneLineParser)
    ml100k = sources.add_parser("ml-100k", help="MovieLens-100K (recbole's copy, or a GroupLens folder with --raw)")
    ml100k.add_argument("--raw", type=Path, help="GroupLens ml-100k/ folder with u.data and u.item")
    ml1m = sources.add_parser("ml-1m", help="MovieLens-1M from GroupLens ratings.dat/movies.dat")
    ml1m.add_argument("--raw", type=Path, required=True, help="GroupLens ml-1m/ folder")
    amazon = sources.add_parser("amazon", help="Amazon Reviews 2018/2023 JSON lines (gzipped or not)")
    amazon.add_argument("--reviews", type=Path, nargs="+", required=True, help="review files, one per category")
    amazon.add_argument("--meta", type=Path, nargs="+", required=True, help="metadata files, one per category")
    amazon.add_argument("--images", type=Path, help="folder of downloaded item images named <item id>.jpg")
    csv = sources.add_parser("csv", help="any rating log: a CSV with columns user,item,rating,timestamp")
    csv.add_argument("--ratings", type=Path, required=True, help="CSV with a header: user,item,rating,timestamp")
    csv.add_argument(
        "--items", type=Path, help="CSV with a header: item,title[,more columns] (default title 'item <id>')"
    )
    csv.add_argument(
        "--split", type=float, nargs=3, default=[0.8, 0.1, 0.1], help="train/valid/test row fractions in time order"
    )
    csv.add_argument("--name", help="the dataset's name (default: the ratings file's name)")
    for source in (amazon, csv):
        source.add_argument("--min-positive-rating", type=float, default=4.0, help="label = rating >= this (default 4)")
    for source in (ml100k, ml1m, amazon, csv):
        source.add_argument("--out", type=Path, help="output folder (default dataset/<name>)")
    images = data_commands.add_parser("images", help="add item images to a dataset folder (images.parquet + images/)")
    images.add_argument("dataset", type=Path, help="a prepared dataset folder")
    source = images.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="folder of item pictures, named by item id (or mapped by --map)")
    source.add_argument(
        "--render",
        action="store_true",
        help="draw a card per item from its title and genres (datasets without pictures)",
    )
    images.add_argument("--map", type=Path, help="CSV with columns <key>,file naming each item's picture in --folder")
    images.add_argument(
        "--key", default="raw_id", help="items column that file names (or the map) use (default raw_id)"
    )
    images.add_argument(
        "--on-bad",
        choices=["error", "exclude"],
        default="error",
        help="a missing, corrupt or too-small picture: fail, or leave the item out and count it",
    )
    images.add_argument("--min-size", type=int, default=64, help="smallest accepted image side in pixels (default 64)")
    images.add_argument("--size", type=int, default=256, help="side of rendered cards (default 256)")
    collm = data_commands.add_parser("import-collm", help="import CoLLM's *_ood2.pkl split")
    collm.add_argument("folder", type=Path, help="folder with train_ood2.pkl, valid_ood2.pkl, test_ood2.pkl")
    collm.add_argument("--out", type=Path, help="output folder (default dataset/collm-<folder name>)")
    diffmm = data_commands.add_parser(
        "import-diffmm",
        help="import a DiffMM-family folder (trnMat/valMat/tstMat.pkl, *_feat.npy) as the implicit full-ranking shape",
    )
    diffmm.add_argument(
        "folder",
        type=Path,
        help="folder with trnMat.pkl, valMat.pkl, tstMat.pkl and any of image_feat.npy, text_feat.npy, audio_feat.npy",
    )
    diffmm.add_argument("--out", type=Path, help="output folder (default dataset/<folder name>)")
    diffurec = data_commands.add_parser(
        "import-diffurec", help="import DiffuRec's dataset.pkl (train/val/test user -> items) as the sequence shape"
    )
    diffurec.add_argument("pickle", type=Path, help="DiffuRec's dataset.pkl")
    diffurec.add_argument("--out", type=Path, help="output folder (default dataset/<the pickle's folder name>)")
    sequences = data_commands.add_parser(
        "sequences",
        help="derive the sequence shape (per-user positive items in time order, leave-one-out) inside a rating dataset folder",
    )
    sequences.add_argument("dataset", type=Path, help="a rating dataset folder (diffrec data prepare ...)")
    sequences.add_argument(
        "--min-length", type=int, default=3, help="users with fewer positive rows are left out (default 3)"
    )
    implicit = data_commands.add_parser(
        "implicit",
        help="derive the implicit full-ranking shape (positive rows, MiniLM text features) inside a rating dataset folder",
    )
    implicit.add_argument("dataset", type=Path, help="a rating dataset folder (diffrec data prepare ...)")
    implicit.add_argument(
        "--no-text", action="store_true", help="no text modality (skips the all-MiniLM-L6-v2 encoding)"
    )

    for name, text in (
        (
            "pretrain",
            "train a collaborative model (MF, LightGCN, SASRec, DIN; on the implicit shape also most-popular, DiffMM, MDMNS, GenRec-V1; on the sequence shape most-popular, SASRec, DiffuRec)",
        ),
        ("evaluate", "evaluate a checkpoint (run.ckpt) on valid/test/warm/cold"),
        ("train", "train the LLM recommender (model.arch: llmrec) or the personalized image model (model.arch: sd3)"),
    ):
        _config_args(commands.add_parser(name, help=text))
    reply = commands.add_parser(
        "reply", help="a short personalized reply about an item from a trained LLM checkpoint (run.ckpt)"
    )
    _config_args(reply)
    reply.add_argument("--user", type=int, required=True, help="user id of the dataset (1..n_users)")
    reply.add_argument("--item", type=int, required=True, help="item id of the dataset (1..n_items)")
    generate = commands.add_parser(
        "generate", help="a personalized image for a user from a trained sd3 checkpoint (run.ckpt)"
    )
    _config_args(generate)
    generate.add_argument("--user", type=int, required=True, help="user id of the dataset (1..n_users)")
    generate.add_argument(
        "--item", type=int, help="item id; its caption is the instruction unless --instruction is given"
    )
    generate.add_argument("--instruction", help="what to draw, e.g. 'a poster for a quiet science-fiction film'")
    generate.add_argument(
        "--seed", type=int, help="sampling seed (default run.seed); the same seed gives the same image"
    )
    generate.add_argument("--alpha", type=float, help="force the fusion gate (0: text only, 1: full preference)")
    recommend = commands.add_parser(
        "recommend",
        help="top-K items for a user from a trained run: collaborative candidates re-ranked by the LLM, as JSON lines",
    )
    _serving_args(recommend)
    who = recommend.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="user id of the dataset (1..n_users)")
    who.add_argument(
        "--liked", type=_item_ids, help="a new user, as the item ids they liked, comma-separated (e.g. 1,50,181)"
    )
    recommend.add_argument("--k", type=int, default=10, help="how many items to return (default 10)")
    recommend.add_argument(
        "--candidates", type=int, default=50, help="how many collaborative candidates the LLM re-ranks (default 50)"
    )
    recommend.add_argument(
        "--rerank",
        choices=["llm", "blend"],
        default="llm",
        help="order the candidates by the LLM's score, or by the mean of its rank and the collaborative rank (default llm)",
    )
    recommend.add_argument("--replies", action="store_true", help="add the LLM's reply about each item")
    recommend.add_argument("--images", type=Path, help="draw each item's personalized image into this folder")
    recommend.add_argument("--instruction", help="what to draw for every item (default: each item's caption)")
    recommend.add_argument("--seed", type=int, help="seed of replies and images (default run.seed)")
    app = commands.add_parser(
        "app", help="a web page on a trained run: pick a user or like a few items, see the ranking, replies and images"
    )
    _serving_args(app)
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    models = commands.add_parser("models", help="model files")
    model_commands = models.add_subparsers(dest="models_command", required=True, parser_class=OneLineParser)
    tiny = model_commands.add_parser(
        "make-tiny",
        help="write a tiny SD3.5-architecture pipeline (DIR/sd3), open_clip model (DIR/clip) and VLM judge (DIR/vlm)",
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    clip = model_commands.add_parser(
        "train-clip",
        help="train an in-domain CLIP scorer (open_clip local-dir folder) on a dataset's item images and captions",
    )
    clip.add_argument("dataset", type=Path, help="a prepared dataset folder with item images")
    clip.add_argument("--out", type=Path, help="output folder (default models/clip-<dataset name>)")
    clip.add_argument(
        "--caption", default="a {genres} movie poster: {title}", help="caption template over the items table's columns"
    )
    clip.add_argument(
        "--genre-prompt",
        default="a {genre} movie poster",
        help="zero-shot prompt per genre, for the held-out genre accuracy",
    )
    clip.add_argument("--resolution", type=int, default=64)
    clip.add_argument("--steps", type=int, default=300)
    clip.add_argument("--batch-size", type=int, default=128)
    clip.add_argument(
        "--held-out", type=float, default=0.2, help="share of the items never trained on, scored at the end"
    )
    clip.add_argument("--seed", type=int, default=0)
    demo = commands.add_parser(
        "demo",
        help="ML-100K end to end: MF, then CoRA with SmolLM2 and personalized images from the tiny SD3, evaluated, with runs/demo/report.html",
    )
    demo.add_argument(
        "--options", nargs="*", default=[], help="overrides for the MF config (train_configs/demo_mf_ml100k.yaml)"
    )
    demo.add_argument(
        "--joint-options",
        nargs="*",
        default=[],
        help="overrides for the DiffRec config (train_configs/demo_ml100k.yaml)",
    )
    return parser


def run_data(args: argparse.Namespace) -> dict:
    """Prepare or import a dataset and write it in the contract's layout."""
    from minigpt4.data.contract import save_rating_dataset

    if args.data_command == "images":
        from minigpt4.data.images import import_item_images, render_item_cards

        if args.render:
            return {"dataset": str(args.dataset), **render_item_cards(args.dataset, args.size)}
        return {
            "dataset": str(args.dataset),
            **import_item_images(args.dataset, args.folder, args.key, args.map, args.on_bad, args.min_size),
        }
    if args.data_command == "import-diffmm":
        from minigpt4.data.implicit import import_diffmm_folder, save_implicit_dataset

        splits, features, meta = import_diffmm_folder(args.folder)
        out = save_implicit_dataset(args.out or Path("dataset") / args.folder.resolve().name, splits, features, meta)
        return {
            "dataset": str(out),
            **{
                key: meta[key]
                for key in ("n_users", "n_items", "modalities", "train_pairs", "valid_pairs", "test_pairs")
            },
        }
    if args.data_command == "import-diffurec":
        from minigpt4.data.sequences import import_diffurec_pickle, save_sequence_dataset

        frame, meta = import_diffurec_pickle(args.pickle)
        out = save_sequence_dataset(args.out or Path("dataset") / args.pickle.resolve().parent.name, frame, meta)
        return {
            "dataset": str(out),
            "n_users": meta["n_users"],
            "n_items": meta["n_items"],
            "users": len(frame),
            "train_items": int(frame["train"].map(len).sum()),
        }
    if args.data_command == "sequences":
        from minigpt4.data.sequences import derive_sequences

        return {"dataset": str(args.dataset), **derive_sequences(args.dataset, args.min_length)}
    if args.data_command == "implicit":
        from minigpt4.data.implicit import derive_implicit

        meta = derive_implicit(args.dataset, text=not args.no_text)
        return {
            "dataset": str(args.dataset),
            **{
                key: meta[key]
                for key in ("n_users", "n_items", "modalities", "train_pairs", "valid_pairs", "test_pairs")
            },
        }
    if args.data_command == "import-collm":
        from minigpt4.data.collm import import_collm

        splits, items, meta = import_collm(args.folder)
    elif args.source == "ml-100k":
        from minigpt4.data.movielens import prepare_ml100k

        splits, items, meta = prepare_ml100k(args.raw)
    elif args.source == "ml-1m":
        from minigpt4.data.movielens import prepare_ml1m

        splits, items, meta = prepare_ml1m(args.raw)
    elif args.source == "csv":
        from minigpt4.data.csv_ratings import prepare_csv

        splits, items, meta = prepare_csv(args.ratings, args.items, args.min_positive_rating, args.split, args.name)
    else:
        from minigpt4.data.amazon import prepare_amazon

        splits, items, meta = prepare_amazon(args.reviews, args.meta, args.min_positive_rating)
    out = save_rating_dataset(args.out or Path("dataset") / meta["name"], splits, items, meta)
    result = {
        "dataset": str(out),
        "users": meta["n_users"],
        "items": meta["n_items"],
        **{k: len(v) for k, v in splits.items()},
    }
    if getattr(args, "images", None) is not None:
        from minigpt4.data.images import import_item_images

        # Items without a usable picture are left out of the images table and counted, not fatal.
        result["images"] = import_item_images(out, args.images, key="raw_id", on_bad="exclude")
    return result


def run_config_command(args: argparse.Namespace) -> dict | None:
    """pretrain / train / evaluate / reply / generate on a config file, by the config's model.arch."""
    from minigpt4.config import load_config

    options = list(args.options) + (["run.evaluate=true"] if args.command == "evaluate" else [])
    config = load_config(args.cfg_path, options)
    arch = config.model.arch
    kind = {"llmrec": "llm", "sd3": "image", "diffrec": "joint"}.get(arch, "collaborative")
    allowed = {
        "pretrain": {"collaborative"},
        "train": {"llm", "image", "joint"},
        "evaluate": {"collaborative", "llm", "image", "joint"},
        "reply": {"llm"},
        "generate": {"image"},
    }
    if kind not in allowed[args.command]:
        hint = "train it with diffrec pretrain" if kind == "collaborative" else "train it with diffrec train"
        raise DiffRecError(
            f"{args.cfg_path}: diffrec {args.command} does not apply: model.arch {arch} is {'an' if kind[0] in 'ai' else 'a'} {kind} model; {hint}"
        )
    if args.command == "reply":
        from minigpt4.llm.reply import write_reply

        return write_reply(config, args.user, args.item)
    if kind == "image":
        from minigpt4.diffusion.generate import generate_for_user
        from minigpt4.training.diffusion import evaluate_images, train_images

        if args.command == "generate":
            return generate_for_user(config, args.user, args.item, args.instruction, args.seed, args.alpha)
        return evaluate_images(config) if config.run.evaluate else train_images(config)
    if kind == "joint":
        from minigpt4.training.joint import train_diffrec

        return train_diffrec(config)
    if kind == "llm":
        from minigpt4.training.llm import train_llm

        return train_llm(config)
    if config.datasets.shape == "implicit":
        from minigpt4.training.implicit import pretrain_implicit

        return pretrain_implicit(config)
    if config.datasets.shape == "sequence":
        from minigpt4.training.sequential import pretrain_sequential

        return pretrain_sequential(config)
    from minigpt4.training.pretrain import pretrain

    return pretrain(config)


def run_recommend(args: argparse.Namespace) -> None:
    """Print one JSON line per recommended item (rank, item, title, both scores; reply and image file on request)."""
    from minigpt4.serving import DiffRec

    if args.images is not None and args.images.exists() and not args.images.is_dir():
        raise DiffRecError(f"--images {args.images}: exists and is not a folder")
    served = DiffRec.load(args.cfg_path, args.options)
    user = args.user if args.user is not None else args.liked
    recommendations = served.recommend(
        user,
        args.k,
        args.candidates,
        replies=args.replies,
        images=args.images is not None,
        instruction=args.instruction,
        seed=args.seed,
        rerank=args.rerank,
    )
    if args.images is not None:  # written only once every image exists
        args.images.mkdir(parents=True, exist_ok=True)
        for rank, entry in enumerate(recommendations, 1):
            path = args.images / f"rank{rank:02d}_item{entry.item}.png"
            entry.image.image.save(path)
            entry.extra["image_file"] = str(path)
    for rank, entry in enumerate(recommendations, 1):
        print(json.dumps({"rank": rank, "user": user, **entry.record()}))


def run_app(args: argparse.Namespace) -> None:
    """Serve the web app until interrupted."""
    from minigpt4.app import launch
    from minigpt4.serving import DiffRec

    launch(DiffRec.load(args.cfg_path, args.options), args.host, args.port, block=True)


def run_models(args: argparse.Namespace) -> dict:
    """Write the tiny SD3 pipeline, open_clip model and VLM judge folders, or train the in-domain CLIP scorer."""
    if args.models_command == "train-clip":
        from minigpt4.training.clip_scorer import train_clip

        if not 0 < args.held_out < 1:
            raise DiffRecError(f"--held-out must be between 0 and 1, got {args.held_out}")
        for name, value in (
            ("--steps", args.steps),
            ("--batch-size", args.batch_size),
            ("--resolution", args.resolution),
        ):
            if value < 1:
                raise DiffRecError(f"{name} must be positive, got {value}")
        out = args.out or Path("models") / f"clip-{args.dataset.name}"
        return train_clip(
            args.dataset,
            out,
            args.caption,
            args.genre_prompt,
            args.resolution,
            args.steps,
            args.batch_size,
            held_out=args.held_out,
            seed=args.seed,
        )
    from minigpt4.diffusion.tiny import write_tiny_clip, write_tiny_sd3, write_tiny_vlm

    return {
        "sd3": str(write_tiny_sd3(args.dir / "sd3", args.seed)),
        "clip": str(write_tiny_clip(args.dir / "clip", args.seed)),
        "vlm": str(write_tiny_vlm(args.dir / "vlm", args.seed)),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffrec`` console script."""
    args = build_parser().parse_args(argv)
    from minigpt4.hardware import configure_threads
    from minigpt4.logs import quiet_libraries
    from minigpt4.recommenders import load_plugins

    configure_threads()  # this process's share of the cores, before any torch work
    quiet_libraries()
    try:
        load_plugins()  # installed packages that register collaborative models
        if args.command == "data":
            result = run_data(args)
        elif args.command == "demo":
            from minigpt4.demo import run_demo

            run_demo(args.options, args.joint_options)  # its summary is the last screen; the figures are in a file
            result = None
        elif args.command == "models":
            result = run_models(args)
        elif args.command == "recommend":
            result = run_recommend(args)
        elif args.command == "app":
            result = run_app(args)
        else:
            result = run_config_command(args)
    except DiffRecError as err:
        print(f"diffrec: error: {err}", file=sys.stderr)
        return 2
    if result is not None and _is_main_process():
        # The per-epoch curve stays in metrics.json; the final line carries the figures.
        print(json.dumps({key: value for key, value in result.items() if key != "curve"}))
    return 0


def _is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch."""
    from accelerate import PartialState

    return PartialState().is_main_process


if __name__ == "__main__":
    sys.exit(main())
