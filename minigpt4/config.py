"""YAML run configuration (``model``, ``datasets``, ``run`` sections) validated by pydantic.

Unknown keys are errors naming the closest valid key, ``--options a.b=value`` overrides any key,
and relative paths resolve against ``DIFFREC_DATA_ROOT`` (datasets) or the config file's folder.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from minigpt4.errors import DiffRecError
from minigpt4.hardware import resolve_dtype_name, resolve_mixed_precision

DATA_ROOT_ENV = "DIFFREC_DATA_ROOT"


class Section(BaseModel):
    """Base of every config section: unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MFConfig(Section):
    """Matrix factorisation: the dot product of user and item embeddings."""

    arch: Literal["mf"] = "mf"
    embedding_size: int = Field(256, gt=0)
    init_std: float = Field(0.1, gt=0)


class LightGCNConfig(Section):
    """LightGCN: embeddings smoothed over the user-item graph of training positives (or all interactions)."""

    arch: Literal["lightgcn"] = "lightgcn"
    embedding_size: int = Field(256, gt=0)
    n_layers: int = Field(2, ge=0)
    graph: Literal["positives", "interactions"] = "positives"  # which training rows become edges
    init_std: float = Field(0.1, gt=0)


class SASRecConfig(Section):
    """SASRec: self-attention over the user's recent positive items, matched to the target item."""

    arch: Literal["sasrec"] = "sasrec"
    embedding_size: int = Field(64, gt=0)
    max_history: int = Field(20, gt=0)
    num_blocks: int = Field(2, gt=0)
    num_heads: int = Field(1, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    init_std: float = Field(0.1, gt=0)


class DINConfig(Section):
    """DIN: target-aware attention pooling of the history, then an MLP."""

    arch: Literal["din"] = "din"
    embedding_size: int = Field(64, gt=0)
    max_history: int = Field(20, gt=0)
    attention_hidden: list[int] = Field(default_factory=lambda: [80, 40])
    mlp_hidden: list[int] = Field(default_factory=lambda: [200, 80])
    use_user_embedding: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.1, gt=0)


class PopularityConfig(Section):
    """Most-popular: every user gets the items with the most training interactions (the full-ranking floor)."""

    arch: Literal["mostpop"] = "mostpop"


class GraphDiffusionConfig(Section):
    """What DiffMM and MDMNS share: the LightGCN-style backbone over the training graph plus per-modality
    Gaussian denoisers on user interaction rows whose top-k outputs regenerate a user-item graph per modality.
    Defaults are DiffMM's published ``Params.py``; the configs carry the per-dataset settings."""

    embedding_size: int = Field(64, gt=0)
    gnn_layers: int = Field(1, ge=0)
    keep_rate: float = Field(0.5, gt=0, le=1)  # edge dropout on each regenerated graph
    feature_projection: Literal["matrix", "linear", "mixed"] = "matrix"  # DiffMM's trans 0 / 1 / 2
    denoiser_dims: list[int] = Field(default_factory=lambda: [1000])
    time_embedding_size: int = Field(10, gt=0)
    denoiser_dropout: float = Field(0.5, ge=0, lt=1)
    normalize_input: bool = False
    steps: int = Field(5, gt=0)
    noise_scale: float = Field(0.1, gt=0)
    noise_min: float = Field(1e-4, gt=0)
    noise_max: float = Field(0.02, gt=0)
    sampling_noise: bool = False
    sampling_steps: int = Field(0, ge=0)
    rebuild_k: int = Field(5, gt=0)  # edges per user in each regenerated graph
    e_loss: float = Field(0.1, ge=0)  # weight of the graph-consistency loss of the denoisers
    ris_lambda: float = Field(0.5, ge=0)
    ris_adj_lambda: float = Field(0.2, ge=0)
    ssl_reg: float = Field(1e-2, ge=0)
    temperature: float = Field(0.5, gt=0)
    contrast: Literal["modalities", "main"] = (
        "modalities"  # cl_method 0: modality vs modality; 1: modality vs main view
    )
    faithful: bool = False  # reproduce the published code where it differs (see the model's docstring)


class DiffMMConfig(GraphDiffusionConfig):
    """DiffMM (Jiang et al., ACM MM 2024): modality-aware graph diffusion with cross-modal contrastive views."""

    arch: Literal["diffmm"] = "diffmm"


class MDMNSConfig(GraphDiffusionConfig):
    """MDMNS: modal-aware guided diffusion, multi-tower fusion and multi-level (noised) negatives on DiffMM's base."""

    arch: Literal["mdmns"] = "mdmns"
    guide_hidden_size: int = Field(64, gt=0)  # the guidance GCN's width
    negative_levels: list[float] = Field(
        default_factory=lambda: [0.1, 0.125, 0.25, 0.5]
    )  # noise scales, as fractions of ``steps``
    info_nce_chunk: int = Field(4096, gt=0)  # rows of the all-pairs InfoNCE denominators computed at once


class GenRecConfig(Section):
    """GenRec-V1 ("Flip is Better than Noise", ACM MM 2025): bit-flip diffusion regenerating a user-item
    graph, modality item-item kNN graphs, interest clusters and debiasing. Defaults are the published
    ``Params.py`` (the TikTok run uses them unchanged)."""

    arch: Literal["genrec"] = "genrec"
    embedding_size: int = Field(64, gt=0)
    gcn_layers: int = Field(1, ge=0)
    keep_rate: float = Field(0.5, gt=0, le=1)  # edge dropout on the generated user-item graph
    knn_k: int = Field(5, gt=0)  # neighbours per item in each modality's item-item graph
    steps: int = Field(5, gt=0)
    sampling_steps: int = Field(5, ge=0)  # the regeneration chain starts from x0 flipped to this step (0: x0)
    flip_temperature: float = Field(1.0, gt=0)  # faithful mode's sigmoid temperature on the flip probability
    bayesian_sampling: bool = True  # reverse steps sample the posterior through the forward flip rates
    denoiser_width: int = Field(512, gt=0)
    denoiser_heads: int = Field(8, gt=0)
    denoiser_layers: int = Field(6, gt=0)
    denoiser_dropout: float = Field(0.2, ge=0, lt=1)
    time_embedding_size: int = Field(10, gt=0)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, gt=0)  # faithful mode's alpha, scaled by the batch's zeros-to-ones ratio
    gen_topk: int = Field(5, gt=0)  # generated positions kept per row before debiasing
    rebuild_k: int = Field(1, gt=0)  # edges per user in the generated graph
    debias: bool = True
    interest_clusters: dict[str, int] = Field(default_factory=dict)  # k-means clusters per modality (default 20)
    debias_sample_ratio: float = Field(0.1, gt=0, le=1)  # faithful mode judges only this share of the flips
    ssl_generation: float = Field(1e-2, ge=0)  # per modality: generated vs original interest contrast
    generation_temperature: float = Field(0.2, gt=0)
    ssl_item: float = Field(0.1, ge=0)  # side vs content views
    ssl_user: float = Field(0.1, ge=0)  # users vs content and side items
    temperature: float = Field(0.5, gt=0)
    faithful: bool = False


ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class DiffuRecConfig(Section):
    """DiffuRec (Li et al., TOIS 2023): the next item's embedding diffused and recovered by a transformer
    approximator conditioned on the history. Defaults are the published ``main.py`` arguments."""

    arch: Literal["diffurec"] = "diffurec"
    embedding_size: int = Field(128, gt=0)
    max_history: int = Field(50, gt=0)
    num_blocks: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    embedding_dropout: float = Field(0.3, ge=0, lt=1)
    diffusion_steps: int = Field(32, gt=1)
    lambda_uncertainty: float = Field(1e-3, ge=0)  # mean and std of the per-entry scale of x_t added to the history
    rescale_timesteps: bool = True  # the time embedding sees t x 1000 / diffusion_steps
    reverse_steps: int = Field(
        32, gt=0
    )  # steps of the reverse chain at inference (evenly spaced, at most diffusion_steps)
    position_embeddings: bool = False  # the published code has them commented out
    init_std: float | None = Field(
        None, gt=0
    )  # item table N(0, init_std); None: N(0, 1), nn.Embedding's default, as published
    faithful: bool = False  # reproduce the published code where it differs (see the model's docstring)

    @model_validator(mode="after")
    def _reverse_steps_fit(self) -> DiffuRecConfig:
        """The reverse chain subsamples the training schedule."""
        if self.reverse_steps > self.diffusion_steps:
            raise ValueError(f"reverse_steps {self.reverse_steps} exceeds diffusion_steps {self.diffusion_steps}")
        return self


class LLMConfig(Section):
    """The causal LM: a local Hugging Face folder, a GGUF file, or (no path) the bundled SmolLM2-135M-Instruct."""

    path: Path | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # auto: bfloat16 where it is native on the device, else float32
    )
    load_in_8bit: bool = False  # needs bitsandbytes and a CUDA device
    gradient_checkpointing: bool = False
    max_length: int = Field(512, gt=8)  # prompt tokens; the oldest history titles go first when a prompt is longer


class PromptConfig(Section):
    """The prompt template (a file in ``prompts/``) and how much history it shows."""

    template: Path
    max_history: int = Field(10, ge=0)


class LoRAConfig(Section):
    """peft LoRA on the LLM, trained on the prompts in every mode (TALLRec's adapter)."""

    enabled: bool = True
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


class CoRAConfig(Section):
    """Per-sample collaborative LoRA: a query generator turns concat(user, item) into A; each target has its own B."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    queries: int = Field(4, gt=0)  # learned queries; each writes rank / queries rows of A
    width: int = Field(256, gt=0)
    heads: int = Field(4, gt=0)


class CoLLMConfig(Section):
    """CoLLM's projector: an MLP from a collaborative embedding to one token embedding."""

    hidden: int = Field(256, gt=0)


class CollabConfig(Section):
    """The frozen collaborative model behind ``collm`` and ``cora``: a ``diffrec pretrain`` checkpoint folder."""

    ckpt: Path


class ReplyConfig(Section):
    """The personalized reply (``diffrec reply``): its template and sampling settings."""

    template: Path | None = None
    chat_template: bool = True  # the filled template is the user's message in the LLM's chat template, when it has one
    max_new_tokens: int = Field(60, gt=0)
    do_sample: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)


class LLMRecConfig(Section):
    """An LLM recommender answering Yes/No: text only (tallrec), embeddings as tokens (collm) or per-sample LoRA (cora)."""

    arch: Literal["llmrec"] = "llmrec"
    mode: Literal["tallrec", "collm", "cora"] = "cora"
    llm: LLMConfig = Field(default_factory=LLMConfig)
    prompt: PromptConfig
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    collab: CollabConfig | None = None
    cora: CoRAConfig = Field(default_factory=CoRAConfig)
    collm: CoLLMConfig = Field(default_factory=CoLLMConfig)
    reply: ReplyConfig = Field(default_factory=ReplyConfig)

    @model_validator(mode="after")
    def _collab_matches_mode(self) -> LLMRecConfig:
        """collm and cora need a collaborative checkpoint; tallrec must not name one it would ignore."""
        if self.mode != "tallrec" and self.collab is None:
            raise ValueError(f"mode {self.mode} needs model.collab.ckpt (a collaborative checkpoint folder)")
        if self.mode == "tallrec" and self.collab is not None:
            raise ValueError("mode tallrec is text only; remove model.collab or choose mode collm or cora")
        if self.cora.rank % self.cora.queries:
            raise ValueError(
                f"model.cora.rank ({self.cora.rank}) must be a multiple of model.cora.queries ({self.cora.queries})"
            )
        return self


# The attention projections of SD3's joint blocks, and of SD3.5's second (image-only) attention.
SD3_ATTENTION = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
]


class PipelineConfig(Section):
    """An SD3/SD3.5 pipeline folder in diffusers' format and how to place it."""

    path: Path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the VAE always stays float32
    use_t5: bool = True  # False leaves T5-XXL out (its tokens become zeros), as the pipeline allows
    max_sequence_length: int = Field(256, gt=0)  # T5 tokens after CLIP's 77
    cpu_offload: bool = False  # model CPU offload; needs an accelerator
    vae_slicing: bool = False
    vae_tiling: bool = False


class DiffusionLoRAConfig(Section):
    """peft LoRA on the SD3 transformer, saved in diffusers' ``pytorch_lora_weights.safetensors``."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(SD3_ATTENTION))


class FusionConfig(Section):
    """Adaptive fusion: K preference tokens and a pooled shift from the user, mixed in by a per-sample gate."""

    tokens: int = Field(4, gt=0)
    hidden: int = Field(256, gt=0)
    # Standardize each preference dimension with the training samples' mean and std (kept with the fusion
    # weights): collaborative user vectors share a large common direction that says nothing about the user.
    standardize: bool = False
    alpha_override: float | None = Field(None, ge=0, le=1)  # sampling only: force the gate for every sample


class FlowMatchingConfig(Section):
    """The rectified-flow objective of SD3 (diffusers' SD3 LoRA trainer) and what each image is captioned with."""

    caption: str = "{title}"  # filled from the items table; the instruction the image is paired with
    # So that the preference has something to decide: a share of training pairs get an instruction that
    # names no item (only the user's preference then tells what to draw), and a share an empty one.
    generic_caption: str = "a movie poster"
    generic_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout: float = Field(0.0, ge=0, le=1)
    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    precondition_outputs: bool = True  # the loss compares the predicted clean latents, as diffusers does
    resolution: int = Field(1024, gt=0)  # training images are resized and centre-cropped to this

    @model_validator(mode="after")
    def _rates_fit(self) -> FlowMatchingConfig:
        """A pair gets one instruction: the shares of generic and empty ones cannot exceed all pairs."""
        if self.generic_rate + self.caption_dropout > 1:
            raise ValueError(f"generic_rate {self.generic_rate} + caption_dropout {self.caption_dropout} exceeds 1")
        return self


class SamplingConfig(Section):
    """``diffrec generate``: SD3.5 Medium's usual settings, and how many images a run folder keeps."""

    steps: int = Field(40, gt=0)
    guidance_scale: float = Field(4.5, ge=0)
    height: int | None = Field(None, gt=0)  # None: the pipeline's default size
    width: int | None = Field(None, gt=0)
    negative_prompt: str = ""
    keep_best: int = Field(8, ge=0)  # images kept per (user, item, instruction), best CLIP score first
    max_images: int = Field(200, gt=0)  # images kept in the run folder in all; the lowest scores go first


class HoldoutConfig(Section):
    """Users whose most recent liked items the image training never sees; personalization is measured on them."""

    users: int = Field(0, ge=0)  # 0: none held out, and no generic-instruction evaluation
    items: int = Field(5, gt=0)  # the most recent liked items held out per user (users with twice as many qualify)


class ClipConfig(Section):
    """The CLIP scorer: an open_clip ``local-dir`` folder, or a built-in model name with a checkpoint file."""

    path: Path
    model_name: str | None = None  # e.g. ViT-B-32 when path is a checkpoint file; None when path is a folder
    batch_size: int = Field(32, gt=0)


class VLMJudgeConfig(Section):
    """An optional vision-language judge from a local Hugging Face folder (image-text-to-text)."""

    path: Path
    max_new_tokens: int = Field(200, gt=0)


class SD3Config(Section):
    """Personalized images: SD3/SD3.5 with LoRA, conditioned on the user's preference by adaptive fusion."""

    arch: Literal["sd3"] = "sd3"
    pipeline: PipelineConfig
    lora: DiffusionLoRAConfig = Field(default_factory=DiffusionLoRAConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    flow: FlowMatchingConfig = Field(default_factory=FlowMatchingConfig)
    # The user preference vector comes from this collaborative model (in a joint ``diffrec`` model it
    # may be left out: the recommender's collaborative model, or the LLM, gives it).
    collab: CollabConfig | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    clip: ClipConfig | None = None
    judge: VLMJudgeConfig | None = None


class JointConfig(Section):
    """How the recommender and the image generator train together in one ``diffrec`` run."""

    preference: Literal["collab", "llm"] = (
        "collab"  # the image side's user vector: collaborative embedding or the LLM's answer-position hidden state
    )
    rec_weight: float = Field(1.0, ge=0)  # loss = rec_weight * BCE + image_weight * flow matching
    image_weight: float = Field(1.0, ge=0)
    schedule: Literal["sum", "alternate"] = "sum"  # alternate: even steps train the recommender, odd steps the images
    image_batch_size: int = Field(4, gt=0)  # liked (user, item image) pairs per micro-batch and process
    eval_images: int = Field(32, gt=0)  # liked test pairs generated and scored at evaluation
    replies: int = Field(0, ge=0)  # personalized replies written at evaluation, for the report
    reply_users: int = Field(
        0, ge=0
    )  # held-out users whose replies (own and shuffled prompt) are scored for personalization


class DiffRecConfig(Section):
    """The whole DiffRec model: the LLM recommender and the personalized image generator, trained jointly."""

    arch: Literal["diffrec"] = "diffrec"
    rec: LLMRecConfig
    image: SD3Config
    joint: JointConfig = Field(default_factory=JointConfig)

    @model_validator(mode="after")
    def _preference_source(self) -> DiffRecConfig:
        """The collaborative preference needs a collaborative model on one side or the other."""
        if self.joint.preference == "collab" and self.image.collab is None and self.rec.collab is None:
            raise ValueError("joint.preference collab needs model.rec.collab or model.image.collab")
        return self


MODEL_CONFIGS: dict[str, type[Section]] = {
    "mf": MFConfig,
    "lightgcn": LightGCNConfig,
    "sasrec": SASRecConfig,
    "din": DINConfig,
    "mostpop": PopularityConfig,
    "diffmm": DiffMMConfig,
    "mdmns": MDMNSConfig,
    "genrec": GenRecConfig,
    "diffurec": DiffuRecConfig,
    "llmrec": LLMRecConfig,
    "sd3": SD3Config,
    "diffrec": DiffRecConfig,
}
CollaborativeConfig = (
    MFConfig
    | LightGCNConfig
    | SASRecConfig
    | DINConfig
    | PopularityConfig
    | DiffMMConfig
    | MDMNSConfig
    | GenRecConfig
    | DiffuRecConfig
)
ModelConfig = Annotated[CollaborativeConfig | LLMRecConfig | SD3Config | DiffRecConfig, Field(discriminator="arch")]
# The data shapes each collaborative arch trains on (ratings: CTR rows; implicit: full ranking of
# user-item pairs; sequence: next-item leave-one-out).
DATA_SHAPES = {
    "mf": {"ratings", "implicit"}, "lightgcn": {"ratings", "implicit"}, "sasrec": {"ratings", "sequence"}, "din": {"ratings"},
    "mostpop": {"implicit", "sequence"}, "diffmm": {"implicit"}, "mdmns": {"implicit"}, "genrec": {"implicit"}, "diffurec": {"sequence"},
}  # fmt: skip


class DatasetConfig(Section):
    """A processed dataset folder (see ``dataset/README.md`` for the contract)."""

    name: str
    path: Path
    # ratings: the CTR splits; implicit: the full-ranking shape (implicit/ in the folder), models trained with BPR;
    # sequence: per-user sequences with leave-one-out targets (sequences/ in the folder), next-item cross-entropy.
    shape: Literal["ratings", "implicit", "sequence"] = "ratings"
    modalities: list[str] | None = None  # implicit: the feature files to read (None: every one the dataset has)


class DevicePlacement(Section):
    """Where each half of a joint model lives in a single process (the paper's two-GPU setup)."""

    llm: str = "cuda:0"
    image: str = "cuda:1"


class RunConfig(Section):
    """Training and evaluation settings."""

    seed: int = 2023
    cpu: bool = False
    batch_size: int = Field(1024, gt=0)
    eval_batch_size: int = Field(2048, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_epochs: int = Field(200, gt=0)
    patience: int = Field(20, gt=0)
    eval_every: int = Field(1, gt=0)
    output_dir: Path = Path("../runs/default")
    evaluate: bool = False
    ckpt: Path | None = None
    # Step-based LLM training (``diffrec train``); the collaborative pre-training ignores these.
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; None: max_epochs over the training rows
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    eval_every_steps: int = Field(100, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 where it is native on the device, else no. Also leave-one-out and full-ranking training (bf16 only);
    # rating-shape pre-training is fp32 (auto means no there).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    train_rows: int | None = Field(None, gt=0)  # a seeded random subsample of each split, for budgets
    valid_rows: int | None = Field(None, gt=0)
    test_rows: int | None = Field(None, gt=0)
    resume_from: Path | None = (
        None  # a checkpoint folder of an earlier run (``.../checkpoints/last`` for pretrain on sequences); ``latest``: the newest one under output_dir
    )
    # Joint (``model.arch: diffrec``) runs: Accelerate state every N steps, the newest K kept.
    checkpoint_every_steps: int | None = Field(None, gt=0)  # None: every eval_every_steps
    keep_checkpoints: int = Field(3, gt=0)
    devices: DevicePlacement | None = None  # one process: the LLM on one device, the image models on another
    # Implicit full-ranking runs (``datasets.shape: implicit``).
    l2_reg: float = Field(
        1e-4, ge=0
    )  # BPR's L2 (MF/LightGCN: the batch's own rows; DiffMM/MDMNS/GenRec: the whole id tables)
    ranking_ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    select_metric: str = "recall@20"  # sequence runs: hr|ndcg@K
    paper_parity: bool = (
        False  # implicit: select the epoch by test select_metric, validation ignored; sequence: DiffuRec's evaluation
    )
    # Leave-one-out runs (``datasets.shape: sequence``).
    mask_history: bool = True  # rank only items outside the user's history
    lr_step_epochs: int | None = Field(None, gt=0)  # StepLR: multiply the learning rate by lr_step_gamma every N epochs
    lr_step_gamma: float = Field(0.1, gt=0, le=1)
    group_by_length: bool = False  # batch training prefixes of similar length (padding-invariant models only)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        """YAML reads a bare ``no`` (``mixed_precision: no``, ``--options run.mixed_precision=no``) as false."""
        return "no" if value is False else value


class Config(Section):
    """A whole run: what to train, on which data, and how."""

    model: ModelConfig
    datasets: DatasetConfig
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _standalone_image_model_needs_collab(self) -> Config:
        """An sd3 model on its own reads the preference from its collaborative checkpoint."""
        if isinstance(self.model, SD3Config) and self.model.collab is None:
            raise ValueError(
                "model.collab.ckpt is required: the collaborative checkpoint whose user embedding is the preference"
            )
        return self

    @model_validator(mode="after")
    def _data_shape_fits_model(self) -> Config:
        """Each collaborative arch trains on its own data shapes; the selection metric must be one the shape reports."""
        arch, shape = self.model.arch, self.datasets.shape
        if arch in DATA_SHAPES and shape not in DATA_SHAPES[arch]:
            raise ValueError(
                f"model.arch {arch} trains on datasets.shape {' or '.join(sorted(DATA_SHAPES[arch]))}, not {shape}"
            )
        if arch in DATA_SHAPES and shape == "ratings" and self.run.mixed_precision not in ("auto", "no"):
            raise ValueError(
                f"run.mixed_precision {self.run.mixed_precision}: {arch} on datasets.shape ratings trains in fp32 (leave-one-out, full-ranking, LLM and image training use it)"
            )
        if shape == "ratings":
            return self
        if self.run.mixed_precision == "fp16":
            raise ValueError(
                f"run.mixed_precision fp16 needs a loss scaler that {shape}-shape training does not have: use bf16 or no"
            )
        names = ("hr", "ndcg") if shape == "sequence" else ("recall", "ndcg", "precision")
        metric, _, k = self.run.select_metric.partition("@")
        if metric not in names or not k.isdigit() or int(k) not in self.run.ranking_ks:
            raise ValueError(
                f"run.select_metric {self.run.select_metric!r} must be {'|'.join(names)}@K with K in run.ranking_ks {self.run.ranking_ks}"
            )
        return self


def _check_keys(section: type[BaseModel], data: Any, where: str) -> None:
    """Reject unknown keys recursively, naming the closest valid key."""
    if not isinstance(data, dict):
        return
    fields = section.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"did you mean '{where}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise DiffRecError(f"unknown key '{where}{key}'; {hint}")
        child = _section_class(section, key, value)
        if child is not None:
            _check_keys(child, value, f"{where}{key}.")


def _section_class(section: type[BaseModel], key: str, value: Any) -> type[BaseModel] | None:
    """The config class of a nested section, resolving the model by its ``arch`` key."""
    if section is Config and key == "model":
        arch = value.get("arch") if isinstance(value, dict) else None
        if arch not in MODEL_CONFIGS:
            close = difflib.get_close_matches(str(arch), list(MODEL_CONFIGS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DiffRecError(f"model.arch must be one of {', '.join(MODEL_CONFIGS)}, got {arch!r}{hint}")
        return MODEL_CONFIGS[arch]
    annotation = section.model_fields[key].annotation
    # ``X | None`` sections are checked as X.
    candidates = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    sections = [arg for arg in candidates if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return sections[0] if len(sections) == 1 else None


def apply_options(data: dict, options: list[str]) -> dict:
    """Override keys from ``a.b=value`` strings; values are parsed as YAML scalars or lists."""
    for option in options:
        key, sep, raw = option.partition("=")
        if not sep or not key:
            raise DiffRecError(f"--options expects key=value, got {option!r}")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DiffRecError(f"--options {key}: '{part}' is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw) if raw else None
    return data


def _resolve(path: Path | None, base: Path) -> Path | None:
    """Make a relative path absolute against ``base``."""
    if path is None or path.is_absolute():
        return path
    return (base / path).resolve()


def load_config(path: str | Path, options: list[str] | None = None) -> Config:
    """Read, override, validate and resolve a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise DiffRecError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DiffRecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DiffRecError(f"{path}: expected a mapping with model, datasets and run sections")
    apply_options(data, options or [])
    try:
        _check_keys(Config, data, "")
        config = Config.model_validate(data)
    except DiffRecError as err:
        raise DiffRecError(f"{path}: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        # Drop the union tag pydantic inserts after 'model' (model.mf.x -> model.x).
        loc = [part for index, part in enumerate(first["loc"]) if not (index == 1 and first["loc"][0] == "model")]
        where = ".".join(str(part) for part in loc)
        raise DiffRecError(f"{path}: key '{where}': {first['msg']} (got {first.get('input')!r})") from None
    config_dir = path.resolve().parent
    data_root = os.environ.get(DATA_ROOT_ENV)
    config.datasets.path = _resolve(config.datasets.path, Path(data_root) if data_root else config_dir)
    config.run.output_dir = _resolve(config.run.output_dir, config_dir)
    config.run.ckpt = _resolve(config.run.ckpt, config_dir)
    if config.run.resume_from is not None and config.run.resume_from.name != "latest":
        config.run.resume_from = _resolve(config.run.resume_from, config_dir)
    model = config.model
    for part in (model.rec, model.image) if isinstance(model, DiffRecConfig) else (model,):
        _resolve_model_paths(part, config_dir)
    return config


def _resolve_model_paths(model: Section, config_dir: Path) -> None:
    """Make an LLM or image model section's paths absolute against the config's folder."""
    collab = getattr(model, "collab", None)
    if collab is not None:
        collab.ckpt = _resolve(collab.ckpt, config_dir)
    if isinstance(model, LLMRecConfig):
        model.llm.path = _resolve(model.llm.path, config_dir)
        model.prompt.template = _resolve(model.prompt.template, config_dir)
        model.reply.template = _resolve(model.reply.template, config_dir)
    if isinstance(model, SD3Config):
        model.pipeline.path = _resolve(model.pipeline.path, config_dir)
        for section in (model.clip, model.judge):
            if section is not None:
                section.path = _resolve(section.path, config_dir)


def resolve_precision(config: Config, llm_device: Any, image_device: Any = None) -> dict[str, dict[str, str]]:
    """Replace each ``auto`` dtype and ``run.mixed_precision`` by what the devices run fast (in place);
    returns ``{key: {"requested": ..., "resolved": ...}}`` for the log and metrics.json."""
    image_device = llm_device if image_device is None else image_device
    model, run = config.model, config.run
    sections: list[tuple[str, Any, Any]] = []
    if isinstance(model, DiffRecConfig):
        sections = [
            ("model.rec.llm", model.rec.llm, llm_device),
            ("model.image.pipeline", model.image.pipeline, image_device),
        ]
    elif isinstance(model, LLMRecConfig):
        sections = [("model.llm", model.llm, llm_device)]
    elif isinstance(model, SD3Config):
        sections = [("model.pipeline", model.pipeline, image_device)]
    chosen = {}
    for where, section, device in sections:
        chosen[f"{where}.dtype"] = {"requested": section.dtype, "resolved": resolve_dtype_name(section.dtype, device)}
        section.dtype = chosen[f"{where}.dtype"]["resolved"]
    requested = run.mixed_precision
    if model.arch in DATA_SHAPES and config.datasets.shape == "ratings":
        run.mixed_precision = "no"  # rating-shape pre-training is fp32 only
    else:
        run.mixed_precision = resolve_mixed_precision(requested, llm_device)
    chosen["run.mixed_precision"] = {"requested": requested, "resolved": run.mixed_precision}
    return chosen


def dump_config(config: Config) -> str:
    """The resolved config as YAML text, for the run folder."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
