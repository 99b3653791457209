"""GenRec-V1 ("Flip is Better than Noise: Unbiased Interest Generation for Multimedia Recommendation",
ACM MM 2025; code: orangeheyue/GenRec-V1).

- Flip diffusion: a binary interaction row is corrupted by flipping bits, a 0 turning 1 with cumulative
  rate gamma_t and a 1 turning 0 with epsilon_t (both scheduled from the batch's sparsity, as published). A
  transformer denoiser predicts the clean row's logits; its loss is a focal loss on the logits, a
  curriculum-weighted KL to the flip posterior and, per modality, an InfoNCE between the original and the
  generated row's aggregates of the modality-weighted item embeddings. The reverse chain samples bits,
  each step through the posterior of the forward rates.
- Generated graph: per user, the chain's bits at its ``gen_topk`` most probable items (the row elsewhere),
  debiased, then the ``rebuild_k`` most probable generated items become the generated user-item graph.
- Interest clusters and debiasing: k-means clusters of each modality's raw item features; a generated
  0 -> 1 flip survives only when the item's cluster is among the user's clusters, and a 1 -> 0 flip is
  undone when the user holds more than (their smallest cluster count + 1) items of the item's cluster.
- Recommender: ids propagated over the training graph and over the generated graph (a softmax mix: the
  content view); per modality, the id items gated by the projected features, propagated over the
  modality's kNN item-item graph, users aggregating them through the normalised training matrix; an
  attention over modalities splits a common part from modality-specific parts, which the content view
  gates (the side view). Score = <content + side>; BPR, L2 on the id tables, and InfoNCE between views.

Differences from the published code, default vs ``faithful: true``:
- Flip schedule: published, a bit flips with probability sigmoid((gamma_t - u) x temperature), u ~ U(0, 1):
  about 38% of all entries at every step whatever t. Default: gamma_t (0 -> 1) and epsilon_t (1 -> 0).
- Focal loss: published alpha = 0.25 x zeros/ones (about 250 on TikTok), so the negatives' weight 1 - alpha
  is negative and the loss falls as the denoiser predicts every item a 1, until its clamp of the
  probability at 1 - 1e-7 stops both the fall and the gradient (kept under ``faithful``); default
  alpha = zeros / (zeros + ones), both class weights in (0, 1), on log-sigmoids without a clamp.
- KL term: published compares the posterior probability of a 0 with the predicted probability of a 1 and
  detaches the prediction, so the term never trains anything; default compares the posterior probability
  of a 1 with the prediction and trains through it, averaging the batch's ones and its zeros apart and
  adding the two means (a mean over all entries is 99.9% zeros on TikTok, and under it the denoiser learns
  the items' marginal and ignores its input: tested). Both modes compute it from log-sigmoids: the
  published clamp of probabilities to [1e-8, 1 - 1e-8] rounds to 1 in fp32, so once the faithful
  denoiser predicts every item a 1 the published KL is inf or NaN (logged only: it trains nothing).
- Generation contrast: published contrasts sampled bits, so no gradient reaches a trained module; default
  contrasts the chain's last-step probabilities.
- Reverse-chain rates: published reads row t - 1 of the [batch, items] rate tensor left by the last
  forward sample, i.e. the rates of step ``sampling_steps - 1`` at every step; default uses step t - 1's.
- Debiasing: published judges a random ``debias_sample_ratio`` of the flips, reads the image clusters for
  every modality and lets the last modality's decision overwrite the others; default judges every flip,
  each modality with its own clusters, keeping what any modality supports. The published default run has
  debiasing off (its ``--OpenInterestDebiase`` flag); the configs say which they use.
- Side view: published TikTok adds (the last modality's specific part + common) / 4; default adds the mean
  of every modality's specific part and the common part.
- Regenerated edges exclude training items by default, and so does the ``gen_topk`` choice before them (published,
  it ranks every item, so a denoiser that restores its row fills it with the user's own items and only popular
  items are left to be new); evaluation uses the whole generated graph (faithful: the edge-dropped one), as in DiffMM.
- Both modes: any subset of modalities, vectorised regeneration and debiasing, no hard-coded ``.cuda()``.

Measured (``bench/genrec_denoiser.py``): trained with a KL averaged over all entries (faithful, and the fixed
mode before its KL weighed the classes apart), the denoiser's output no longer depends on its input row, on
TikTok and ML-100K: every user gets the same chain probabilities and the generated graph links users to a
handful of popular items (4 or 5 on TikTok).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler
from torch import nn

from minigpt4.config import GenRecConfig
from minigpt4.data.tensors import RatingBatch
from minigpt4.errors import DiffRecError
from minigpt4.recommenders.base import EpochContext
from minigpt4.recommenders.diffmm import Denoise, MultimodalGraphModel, step_embedding
from minigpt4.recommenders.graph import (
    all_pairs_info_nce,
    bpr_loss,
    dense_rows,
    drop_edges,
    knn_graph,
    normalized_adjacency,
    sparse_mm,
    top_k_edges,
)

DEFAULT_CLUSTERS = 20  # the published kmeans_cluster_num
FOCAL_CLAMP = 1e-7  # the published focal loss clamps the probability to [1e-7, 1 - 1e-7]


def bernoulli_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(target) || Bernoulli(sigmoid(logits))) per entry, finite for targets of 0 or 1 and for
    saturated logits (probabilities clamped in fp32 round to 1 and give inf or NaN)."""
    return (
        torch.xlogy(target, target)
        + torch.xlogy(1 - target, 1 - target)
        - target * F.logsigmoid(logits)
        - (1 - target) * F.logsigmoid(-logits)
    )


class FlipDiffusion(nn.Module):
    """Bit-flip corruption of binary rows, its posterior, and the reverse sampling chain."""

    def __init__(self, steps: int, temperature: float, faithful: bool, eps: float = 1e-8) -> None:
        super().__init__()
        self.steps, self.temperature, self.faithful, self.eps = steps, temperature, faithful, eps

    def rates(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative 0 -> 1 and 1 -> 0 flip rates per step, scheduled from the batch's sparsity."""
        sparsity = (x0 == 0).float().mean()
        gamma_start = 0.1 * (1 - sparsity) + 0.001
        epsilon_start = 0.005 * sparsity + 0.0001
        fraction = torch.linspace(0, 1, self.steps, device=x0.device)
        gamma = gamma_start + (0.1 * gamma_start - gamma_start) * fraction
        epsilon = (epsilon_start + (0.1 * epsilon_start - epsilon_start) * fraction).clamp(max=0.01)
        return 1 - torch.cumprod(1 - gamma, 0), 1 - torch.cumprod(1 - epsilon, 0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, rates: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x_t: x0 with bits flipped at step t's rates (faithful: the published sigmoid of a uniform draw)."""
        up, down = rates[0][t][:, None], rates[1][t][:, None]
        if self.faithful:
            u = torch.rand_like(x0)
            flip = torch.where(
                x0 == 0, torch.sigmoid((up - u) * self.temperature), torch.sigmoid((down - u) * self.temperature)
            )
        else:
            flip = torch.where(x0 == 0, up, down).expand_as(x0)
        return torch.where(torch.bernoulli(flip).bool(), 1 - x0, x0)

    def posterior(self, x0: torch.Tensor, t: torch.Tensor, rates: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The published flip posterior given x0 at step t; it is the probability of a 0 (about 0.99 where x0 is 0)."""
        up, down = rates[0][t][:, None], rates[1][t][:, None]
        numerator = torch.where(x0 == 0, 1 - up, down)
        denominator = torch.where(x0 == 0, 1 - up + down, up + 1 - down)
        return numerator / (denominator + self.eps)

    def p_sample(
        self, predict: Denoise, x0: torch.Tensor, sampling_steps: int, bayesian: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse chain from x0 flipped to step ``sampling_steps``: sampled bits and the last step's
        probabilities (only that last prediction keeps a gradient)."""
        rates = self.rates(x0)
        start = max(sampling_steps - 1, 0)
        x = x0 if sampling_steps == 0 else self.q_sample(x0, torch.full((len(x0),), start, device=x0.device), rates)
        grad = torch.is_grad_enabled()
        for step in reversed(range(self.steps)):
            t = torch.full((len(x),), step, device=x.device)
            with torch.set_grad_enabled(grad and step == 0):
                probs = torch.sigmoid(predict(x, t))
            if bayesian and step > 0:
                index = start if self.faithful else step - 1
                up, down = rates[0][index], rates[1][index]
                p0 = probs * (1 - up) + (1 - probs) * down
                p1 = probs * up + (1 - probs) * (1 - down)
                x = torch.bernoulli((p1 / (p0 + p1)).detach())
            else:
                x = torch.bernoulli(probs.detach())
        return x, probs

    def training_losses(
        self,
        predict: Denoise,
        x0: torch.Tensor,
        modal_items: list[torch.Tensor],
        gamma: float,
        alpha: float,
        temperature: float,
    ) -> dict[str, torch.Tensor]:
        """Focal loss on the predicted logits, curriculum-weighted KL to the posterior, and per-modality
        InfoNCE between original and generated interest aggregates (``generation`` is their sum)."""
        rates = self.rates(x0)
        t = torch.randint(0, self.steps, (len(x0),), device=x0.device)
        logits = predict(self.q_sample(x0, t, rates), t).float()  # the losses in fp32 under bf16 autocast
        zeros_per_one = ((1 - x0).sum() / (x0.sum() + self.eps)).detach()
        positive_weight = alpha * zeros_per_one if self.faithful else zeros_per_one / (1 + zeros_per_one)
        p = torch.sigmoid(logits)
        if self.faithful:  # the published clamp: it bounds the loss that the negative class weight drives down
            focal_p = p.clamp(FOCAL_CLAMP, 1 - FOCAL_CLAMP)
            log_p, log_not_p = focal_p.log(), (1 - focal_p).log()
        else:
            focal_p, log_p, log_not_p = p, F.logsigmoid(logits), F.logsigmoid(-logits)
        positive = -positive_weight * (1 - focal_p).pow(gamma) * x0 * log_p
        negative = -(1 - positive_weight) * focal_p.pow(gamma) * (1 - x0) * log_not_p
        focal = (positive + negative).sum() / x0.numel()
        zero = self.posterior(x0, t, rates)
        curriculum = (t.float() / self.steps).clamp(0, 0.5)[:, None]
        if self.faithful:  # the published clamp of the prediction to [eps, 1 - eps], as logits; a mean over all entries
            limit = math.log((1 - self.eps) / self.eps)
            kl = (curriculum * bernoulli_kl(zero, logits.detach().clamp(-limit, limit))).mean()
        else:  # the prediction is of a 1; the batch's ones and zeros weigh equally, or the zeros drown the ones
            kl = curriculum * bernoulli_kl(1 - zero, logits)
            ones = x0.sum()
            kl = (kl * x0).sum() / ones.clamp(min=1) + (kl * (1 - x0)).sum() / (x0.numel() - ones).clamp(min=1)
        bits, last_probs = self.p_sample(predict, x0, self.steps, bayesian=True)
        generated = bits if self.faithful else last_probs
        generation = sum(
            all_pairs_info_nce(x0 @ items, generated @ items, temperature, chunk=len(x0)) for items in modal_items
        )
        return {"focal": focal, "kl": kl, "generation": generation}


class FlipDenoiser(nn.Module):
    """The published ModalDenoiseTransformer: row + step embedding projected to one token, shifted and scaled
    by the step (adaLN), a TransformerDecoder over that token (zero memory), an MLP head to item logits."""

    def __init__(self, n_items: int, width: int, heads: int, layers: int, dropout: float, time_size: int) -> None:
        super().__init__()
        if width % heads:
            raise DiffRecError(f"genrec denoiser_width {width} is not divisible by denoiser_heads {heads}")
        self.time_size = time_size
        self.time_layer = nn.Linear(time_size, time_size)
        self.input = nn.Linear(n_items + time_size, width)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_size, 2 * width))
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(width, heads, width, dropout, batch_first=True), layers
        )
        self.head = nn.Sequential(
            nn.Linear(width, width // 2), nn.LayerNorm(width // 2), nn.GELU(), nn.Linear(width // 2, n_items)
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0.01)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits of the clean row, [B, n_items]."""
        time = self.time_layer(step_embedding(t, self.time_size))
        hidden = self.input(torch.cat([x, time], dim=-1))[:, None]
        shift, scale = self.modulation(time)[:, None].chunk(2, dim=-1)
        hidden = hidden * (1 + scale) + shift
        return self.head(self.decoder(hidden, torch.zeros_like(hidden)).squeeze(1))


def projection(in_size: int, out_size: int) -> nn.Sequential:
    """Linear, BatchNorm, LeakyReLU(0.2), Dropout(0.1): the published feature projection block."""
    return nn.Sequential(nn.Linear(in_size, out_size), nn.BatchNorm1d(out_size), nn.LeakyReLU(0.2), nn.Dropout(0.1))


def interest_clusters(features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k-means labels of standardised item features."""
    values = StandardScaler().fit_transform(features.float().numpy())
    return torch.as_tensor(
        KMeans(n_clusters=min(k, len(values)), n_init="auto", random_state=seed).fit(values).labels_, dtype=torch.long
    )


class GenRec(MultimodalGraphModel):
    """The recommender's tables and blocks, one flip denoiser, the kNN graphs (rebuilt from the feature
    buffers), the interest clusters and the generated graph (stored buffers)."""

    denoiser_group = "denoiser"

    def build(self, config: GenRecConfig, features: dict[str, torch.Tensor]) -> None:
        """The residual, modal and gate blocks, kNN graphs and interest clusters per modality, the flip denoiser."""
        size, n_users, n_items = config.embedding_size, self.n_users, self.n_items
        self.residual = nn.ModuleDict()
        self.modal = nn.ModuleDict({m: projection(size, size) for m in self.modalities})
        self.gates = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(size, size), nn.BatchNorm1d(size), nn.Sigmoid()) for m in self.modalities}
        )
        self.knn_graphs: dict[str, torch.Tensor] = {}
        for modality in self.modalities:
            values = features[modality].float()
            self.residual[modality] = projection(values.shape[1], size)
            self.knn_graphs[modality] = knn_graph(values, config.knn_k)
            clusters = config.interest_clusters.get(modality, DEFAULT_CLUSTERS)
            self.register_buffer(f"clusters_{modality}", interest_clusters(values, clusters))
        self.residual_scale = nn.Parameter(torch.ones(1))
        self.common = nn.Sequential(
            nn.Linear(size, size), nn.BatchNorm1d(size), nn.Tanh(), nn.Linear(size, 1, bias=False)
        )
        self.view_weights = nn.Parameter(torch.ones(2))  # training graph vs generated graph
        for module in [*self.residual.values(), *self.modal.values(), *self.gates.values(), self.common]:
            for layer in module:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
        self.denoiser = FlipDenoiser(
            n_items,
            config.denoiser_width,
            config.denoiser_heads,
            config.denoiser_layers,
            config.denoiser_dropout,
            config.time_embedding_size,
        )
        self.diffusion = FlipDiffusion(config.steps, config.flip_temperature, config.faithful)
        self.store_graph("generated", normalized_adjacency(torch.empty(0), torch.empty(0), n_users, n_items))
        self._training_graph: torch.Tensor | None = None
        self._graphs: dict[str, torch.Tensor] = {}

    # -- graphs ------------------------------------------------------------------------------------

    def _fixed_graphs(self) -> dict[str, torch.Tensor]:
        """The training graph with self-loops, the normalised user x item matrix and the kNN graphs, on the model's device."""
        device = self.user_table.device
        if not self._graphs or self._graphs["main"].device != device:
            users, items = self.graph_edges - 1
            bipartite = normalized_adjacency(users, items, self.n_users, self.n_items, self_loops=False)
            rows, cols = bipartite.indices()
            upper = rows < self.n_users
            user_items = torch.sparse_coo_tensor(
                torch.stack([rows[upper], cols[upper] - self.n_users]),
                bipartite.values()[upper],
                (self.n_users, self.n_items),
                check_invariants=False,
            ).coalesce()
            self._graphs = {
                "main": normalized_adjacency(users, items, self.n_users, self.n_items).to(device),
                "user_items": user_items.to(device),
            }
            self._graphs |= {f"knn_{m}": graph.to(device) for m, graph in self.knn_graphs.items()}
        return self._graphs

    def generated_graph(self) -> torch.Tensor:
        """The generated user-item graph: edge-dropped while training, the stored one otherwise."""
        if self.training and self._training_graph is not None:
            return self._training_graph
        return self.stored_graph("generated", self.n_users + self.n_items)

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Load, forgetting the current run's edge-dropped graph."""
        self._training_graph = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- views ---------------------------------------------------------------------------------------

    def modal_features(self, modality: str) -> torch.Tensor:
        """Projected item features with the published residual: s x r + modal(r), r = residual(features)."""
        residual = self.residual[modality](self.feature(modality))
        return self.residual_scale * residual + self.modal[modality](residual)

    def _layer_mean(self, graph: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Mean of the input and its ``gcn_layers`` propagations."""
        layers = [layer]
        for _ in range(self.config.gcn_layers):
            layers.append(sparse_mm(graph, layers[-1]))
        return torch.stack(layers).mean(0)

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Node tables (users then items): the score view (content + side), the side view, the content view."""
        graphs = self._fixed_graphs()
        ids = torch.cat([self.user_table, self.item_table])
        weights = torch.softmax(self.view_weights, 0)
        content = weights[0] * self._layer_mean(graphs["main"], ids) + weights[1] * self._layer_mean(
            self.generated_graph(), ids
        )
        modal_views = []
        for modality in self.modalities:
            items = self.item_table * self.gates[modality](self.modal_features(modality))
            for _ in range(self.config.gcn_layers):
                items = sparse_mm(graphs[f"knn_{modality}"], items)
            modal_views.append(torch.cat([sparse_mm(graphs["user_items"], items), items]))
        attention = torch.softmax(torch.cat([self.common(view) for view in modal_views], dim=-1), dim=-1)
        common = sum(attention[:, index : index + 1] * view for index, view in enumerate(modal_views))
        specific = [self.gates[m](content) * (view - common) for m, view in zip(self.modalities, modal_views)]
        side = (specific[-1] + common) / 4 if self.config.faithful else (sum(specific) + common) / (len(specific) + 1)
        return content + side, side, content

    def _split(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A node table as its user and item parts."""
        return table[: self.n_users], table[self.n_users :]

    def ranking_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The score view's user and item tables."""
        return self._split(self.views()[0])

    def user_embeddings(self, batch: RatingBatch) -> torch.Tensor:
        """The user's row of the score view."""
        return self.ranking_tables()[0][batch.uid - 1]

    def item_embeddings(self, items: torch.Tensor) -> torch.Tensor:
        """The item's row of the score view (zeros for the padding id)."""
        table = self.ranking_tables()[1]
        return torch.cat([table.new_zeros(1, table.shape[1]), table])[items]

    # -- training -------------------------------------------------------------------------------------

    def pair_loss(
        self, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, l2_reg: float
    ) -> dict[str, torch.Tensor]:
        """BPR on the score view + L2 on the id tables + InfoNCE between side, content and score views."""
        score, side, content = (self._split(view) for view in self.views())
        bpr = bpr_loss(score[0][users], score[1][positives], score[1][negatives])
        reg = l2_reg * (self.user_table.square().sum() + self.item_table.square().sum())
        nce = partial(all_pairs_info_nce, temperature=self.config.temperature, chunk=len(users))
        views = nce(side[1][positives], content[1][positives]) + nce(side[0][users], content[0][users])
        user_item = nce(score[0][users], content[1][positives]) + nce(score[0][users], side[1][positives])
        contrast = self.config.ssl_item * views + self.config.ssl_user * user_item
        return {"loss": bpr + reg + contrast, "bpr": bpr, "reg": reg, "contrast": contrast}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """The recommender's parameters and the denoiser's, each with its own Adam (as published)."""
        denoiser = set(self.denoiser.parameters())
        return {
            "model": [p for p in self.parameters() if p not in denoiser],
            self.denoiser_group: list(self.denoiser.parameters()),
        }

    def denoising_losses(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flip denoiser's weighted loss terms on a batch of training rows (their sum is trained)."""
        config = self.config
        with torch.no_grad():
            modal_items = [self.item_table * self.modal_features(m) for m in self.modalities]
        losses = self.diffusion.training_losses(
            self.denoiser, rows, modal_items, config.focal_gamma, config.focal_alpha, config.generation_temperature
        )
        return losses | {"generation": config.ssl_generation * losses["generation"]}

    def prepare_epoch(self, context: EpochContext) -> dict[str, float]:
        """Train the flip denoiser for one pass over the users, then regenerate the user-item graph."""
        optimizer = context.optimizers[self.denoiser_group]
        order = torch.randperm(self.n_users, generator=context.generator).numpy()
        sums: dict[str, float] = {}
        batches = range(0, self.n_users, context.batch_size)
        for start in batches:
            with context.autocast():
                losses = self.denoising_losses(
                    dense_rows(context.train, order[start : start + context.batch_size], context.device)
                )
            total = sum(losses.values())
            if not torch.isfinite(total):  # the trainer stops and names the checkpoint it keeps
                return {"denoise": total.item()}
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            for name, value in {"denoise": total, **losses}.items():
                sums[name] = sums.get(name, 0.0) + value.item()
        self.regenerate_graph(context)
        return {name: total / len(batches) for name, total in sums.items()}

    def debias(self, rows: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Keep the 0 -> 1 flips whose item cluster the user already likes; undo the 1 -> 0 flips of items in
        clusters the user holds more than (their smallest cluster count + 1) items of."""
        rising, falling = generated > rows, generated < rows
        if self.config.faithful:  # a random share of the flips, judged on the image (else first) modality's clusters
            judged = torch.rand_like(rows) < self.config.debias_sample_ratio
            rising, falling = rising & judged, falling & judged
            modalities = ["image" if "image" in self.modalities else self.modalities[0]]
        else:
            modalities = self.modalities
        liked = torch.zeros_like(rows, dtype=torch.bool)
        frequent = torch.zeros_like(rows, dtype=torch.bool)
        for modality in modalities:
            labels = getattr(self, f"clusters_{modality}")
            counts = rows @ F.one_hot(labels, int(labels.max()) + 1).float()  # [B, clusters]
            per_item = counts[:, labels]
            smallest = counts.masked_fill(counts == 0, torch.inf).min(1, keepdim=True).values
            liked |= per_item > 0
            frequent |= per_item > smallest + 1
        out = generated.clone()
        out[rising & ~liked] = 0
        out[falling & frequent] = 1
        return out

    @torch.no_grad()
    def regenerate_graph(self, context: EpochContext) -> None:
        """Every user's row through the flip chain, its bits kept at the ``gen_topk`` most probable items (training
        items excluded unless ``faithful``); the ``rebuild_k`` most probable generated items (again excluding
        training items unless ``faithful``) become the generated graph, edge-dropped for training."""
        config = self.config
        users_out, items_out = [], []
        for start in range(0, self.n_users, context.batch_size):
            users = np.arange(start, min(start + context.batch_size, self.n_users))
            rows = dense_rows(context.train, users, context.device)
            bits, probs = self.diffusion.p_sample(self.denoiser, rows, config.sampling_steps, config.bayesian_sampling)
            # a denoiser that restores the row ranks the user's own items first: fixed mode ranks only the others
            candidates = probs if config.faithful else probs.masked_fill(rows > 0, -torch.inf)
            top = torch.zeros_like(rows, dtype=torch.bool).scatter_(
                1, candidates.topk(config.gen_topk, dim=1).indices, True
            )
            generated = torch.where(top, bits, rows)
            if config.debias:
                generated = self.debias(rows, generated)
            scores = generated * probs if config.faithful else candidates.masked_fill(generated == 0, -torch.inf)
            u, i = top_k_edges(scores, torch.as_tensor(users, device=context.device), config.rebuild_k)
            users_out.append(u)
            items_out.append(i)
        full = normalized_adjacency(torch.cat(users_out), torch.cat(items_out), self.n_users, self.n_items)
        self._training_graph = drop_edges(full, config.keep_rate)
        self.store_graph("generated", self._training_graph if config.faithful else full)
