"""Tiny models in the real on-disk formats, for tests and the demo: an SD3-architecture pipeline folder
(diffusers ``model_index.json`` layout, SD3.5's dual attention and RMS q/k norm, no T5), an open_clip
``local-dir`` folder and a LLaVA folder for the VLM judge. All load through the same loaders as the
published weights.

The CLIP tokenizers are the real ones: their vocabulary is rebuilt from the BPE merges that ship
inside open-clip-torch, exactly as open_clip's ``SimpleTokenizer`` builds it.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path

import torch

from minigpt4.io import atomic_folder

CLIP_VOCAB_SIZE = 49408
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_IMAGE_SIZE = 64


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte to printable-character map, which CLIP's BPE vocabulary is written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def write_clip_tokenizer(folder: Path) -> Path:
    """Write CLIP's BPE tokenizer (vocab.json, merges.txt) in Hugging Face's format from open_clip's merges."""
    merges_gz = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(merges_gz.read_bytes()).decode("utf-8").split("\n")
    # 256 byte symbols, their 256 word-final forms, the merges and 2 special tokens make 49,408 entries.
    merges = lines[1 : CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False)
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return folder


def _tiny_clip_text_encoder(width: int, seed: int):
    """A two-layer CLIP text encoder with a projection head (SD3's CLIP-L/CLIP-G, shrunk)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config)


def write_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny Stable Diffusion 3.5-architecture pipeline folder (64 px, no T5) loadable by diffusers."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer

    folder = Path(folder)
    clip_width = 32
    torch.manual_seed(seed)
    # SD3's VAE: 16 latent channels, its shift and scaling factors; two blocks make 64 px -> 32 latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        sample_size=TINY_IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )
    # A trained VAE's posterior is nearly deterministic: give the random one a small fixed variance
    # (log-variance -10, std 0.007) so that latents are a function of the image, as with real weights.
    with torch.no_grad():
        log_variance = vae.encoder.conv_out
        log_variance.weight[16:].zero_()
        log_variance.bias[16:].fill_(-10.0)
    torch.manual_seed(seed + 1)
    # SD3.5 Medium's MMDiT-X shape, shrunk: dual attention in the first block, RMS q/k norm; the width
    # (64) is at least a patch's latent values (2 x 2 x 16), as in the real model, so outputs are full rank.
    transformer = SD3Transformer2DModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=2 * clip_width,
        caption_projection_dim=64,
        pooled_projection_dim=2 * clip_width,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    with atomic_folder(folder) as partial:
        tokenizer_folder = write_clip_tokenizer(partial / "_clip_tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae,
            text_encoder=_tiny_clip_text_encoder(clip_width, seed + 2),
            tokenizer=tokenizer,
            text_encoder_2=_tiny_clip_text_encoder(clip_width, seed + 3),
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        pipeline.save_pretrained(partial)
        for file in tokenizer_folder.iterdir():
            file.unlink()
        tokenizer_folder.rmdir()
    return folder


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny open_clip ViT model as a ``local-dir`` folder (open_clip_config.json + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2},
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    with atomic_folder(folder) as partial:
        (partial / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        save_file(
            {name: tensor.contiguous() for name, tensor in model.state_dict().items()},
            partial / "open_clip_model.safetensors",
        )
    return folder


# The processor's chat template places the image before the text of a user turn (ChatML, as SmolLM2's).
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_vlm(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny LLaVA image-text-to-text folder (CLIP vision tower, Llama text model, SmolLM2's tokenizer)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from minigpt4.llm.loading import bundled_smollm2_folder

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(bundled_smollm2_folder())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    size, patch = 32, 16
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=size,
        patch_size=patch,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=OPENAI_MEAN,
            image_std=OPENAI_STD,
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VLM_CHAT_TEMPLATE,
    )
    with atomic_folder(folder) as partial:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
    return folder
