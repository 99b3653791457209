"""Sections of the collaborative models (``model.arch`` mf, lightgcn, sasrec, din, mostpop, diffmm, mdmns, genrec,
diffurec) and the data shapes each trains on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from minigpt4.config.base import Section


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
# The data shapes each collaborative arch trains on (ratings: CTR rows; implicit: full ranking of
# user-item pairs; sequence: next-item leave-one-out).
DATA_SHAPES = {
    "mf": {"ratings", "implicit"}, "lightgcn": {"ratings", "implicit"}, "sasrec": {"ratings", "sequence"}, "din": {"ratings"},
    "mostpop": {"implicit", "sequence"}, "diffmm": {"implicit"}, "mdmns": {"implicit"}, "genrec": {"implicit"}, "diffurec": {"sequence"},
}  # fmt: skip
