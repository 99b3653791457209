"""CoRA on a toy attention block small enough to check by hand: the hook adds x A_s^T B * alpha / rank to each
target's output, per sample; each generator writes A as its docstring says; bad targets and calls are one
clear error. (tests/test_llm.py runs CoRA inside the tiny Llama and trains it.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minigpt4.config import CoRAConfig
from minigpt4.errors import DiffRecError
from minigpt4.llm.cora import CoRA, LoRAGenerator, QFormerGenerator

HIDDEN, USER, ITEM = 8, 3, 5


class Block(nn.Module):
    """Two projections CoRA can target (one wider out), and one that is not linear."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, 6)
        self.v_proj = nn.Linear(HIDDEN, 4)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.v_proj(x)


class Wrapped(nn.Module):
    """A peft-style wrapper: the linear sits in ``base_layer``."""

    def __init__(self) -> None:
        super().__init__()
        self.base_layer = nn.Linear(HIDDEN, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)


def config(**changes) -> CoRAConfig:
    settings = {"rank": 4, "alpha": 12.0, "target_modules": ["q_proj", "v_proj"], "queries": 2, "width": 8,
                "heads": 2, "layers": 2, "qformer_heads": 2, "ffn": 16}  # fmt: skip
    return CoRAConfig(**(settings | changes))


def attached(generator: str = "ours", **changes) -> tuple[Block, CoRA]:
    """A block with CoRA on q and v, random Bs (a fresh CoRA's are zero) and inputs."""
    torch.manual_seed(0)
    block = Block()
    cora = CoRA(block, USER, ITEM, config(generator=generator, **changes))
    with torch.no_grad():
        for b in cora.lora_b.values():
            b.normal_()
    return block, cora.eval()


@pytest.mark.parametrize("generator", ["ours", "published"])
@pytest.mark.parametrize("fp32", [False, True])
def test_the_hook_adds_each_samples_low_rank_update(generator, fp32):
    block, cora = attached(generator, fp32_update=fp32)
    user, item, x = torch.randn(2, USER), torch.randn(2, ITEM), torch.randn(2, 3, HIDDEN)
    a = cora.set_weights(user, item)
    assert a.shape == (2, 4, HIDDEN) and cora.lora_a is a
    q, v = block(x)
    scaling = 12.0 / 4
    for sample in range(2):
        update = {key: x[sample] @ a[sample].T @ b * scaling for key, b in cora.lora_b.items()}
        want_q = F.linear(x[sample], block.q_proj.weight, block.q_proj.bias) + update["q_proj"]
        want_v = F.linear(x[sample], block.v_proj.weight, block.v_proj.bias) + update["v_proj"]
        assert torch.allclose(q[sample], want_q, atol=1e-5) and torch.allclose(v[sample], want_v, atol=1e-5)
    assert cora.lora_b["q_proj"].shape == (4, 6) and cora.lora_b["v_proj"].shape == (4, 4)
    cora.remove()
    assert torch.equal(block(x)[0], block.q_proj(x)) and cora._handles == []


def test_fresh_bs_are_zero_so_cora_starts_from_the_base_model():
    torch.manual_seed(0)
    block = Block()
    cora = CoRA(block, USER, ITEM, config())
    x = torch.randn(2, 3, HIDDEN)
    cora.set_weights(torch.randn(2, USER), torch.randn(2, ITEM))
    assert all(not b.any() for b in cora.lora_b.values())
    assert torch.equal(block(x)[0], F.linear(x, block.q_proj.weight, block.q_proj.bias))


def test_the_fp32_update_keeps_the_output_dtype_and_computes_in_fp32():
    block, cora = attached("ours", fp32_update=True)
    block.to(torch.bfloat16)
    x = torch.randn(2, 3, HIDDEN, dtype=torch.bfloat16)
    a = cora.set_weights(torch.randn(2, USER), torch.randn(2, ITEM))
    q, _ = block(x)
    cora.remove()
    update = (x.float() @ a.float().transpose(1, 2) @ cora.lora_b["q_proj"].float()) * 3.0
    assert q.dtype == torch.bfloat16 and torch.equal(q, block.q_proj(x) + update.to(torch.bfloat16))


def test_without_the_fp32_update_a_and_b_take_the_inputs_dtype():
    """Our generator's update runs in the input's dtype: a bf16 model with fp32 CoRA weights still adds it."""
    block, cora = attached("ours")
    block.to(torch.bfloat16)
    x = torch.randn(2, 3, HIDDEN, dtype=torch.bfloat16)
    a = cora.set_weights(torch.randn(2, USER), torch.randn(2, ITEM))
    q, _ = block(x)
    cora.remove()
    low = x @ a.transpose(1, 2).to(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and torch.equal(
        q, block.q_proj(x) + low @ cora.lora_b["q_proj"].to(torch.bfloat16) * 3.0
    )


def test_the_update_reads_its_input_through_dropout_only_while_training():
    block, cora = attached("ours", dropout=0.5)
    x = torch.randn(2, 3, HIDDEN)
    cora.set_weights(torch.randn(2, USER), torch.randn(2, ITEM))
    evaluated = block(x)[0]
    assert torch.equal(evaluated, block(x)[0])
    cora.train()
    torch.manual_seed(1)
    first = block(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(first, block(x)[0]) and not torch.equal(first, evaluated)


def test_defaults_of_the_two_generators():
    ours, published = config(), config(generator="published")
    assert (ours.update_dropout, ours.update_in_fp32) == (0.0, False)
    assert (published.update_dropout, published.update_in_fp32) == (0.05, True)
    assert config(dropout=0.2, generator="published").update_dropout == 0.2
    assert config(fp32_update=False, generator="published").update_in_fp32 is False
    _, cora = attached("published")
    assert isinstance(cora.generator, QFormerGenerator) and cora.dropout.p == 0.05 and cora.fp32 is True
    assert cora.scaling == 3.0
    _, cora = attached("ours")
    assert isinstance(cora.generator, LoRAGenerator) and cora.dropout.p == 0.0 and cora.fp32 is False


def test_our_generator_writes_rank_rows_scaled_by_one_over_root_hidden():
    torch.manual_seed(0)
    generator = LoRAGenerator(USER + ITEM, HIDDEN, config()).eval()
    collab = torch.randn(3, USER + ITEM)
    memory = generator.memory(collab).view(3, 2, 8)
    attended, _ = generator.attention(generator.query.expand(3, -1, -1), memory, memory)
    rows = generator.rows(generator.norm(attended))  # [3, queries, rank / queries * hidden]
    assert torch.allclose(generator(collab), rows.reshape(3, 4, HIDDEN) / math.sqrt(HIDDEN), atol=1e-6)
    assert generator.query.abs().max() < 0.1  # learned queries start small (std 0.02)
    assert generator.rows.out_features == (4 // 2) * HIDDEN and generator.memory[0].out_features == 2 * 8
    assert isinstance(generator.memory[1], nn.GELU)


def test_the_published_generator_maps_the_queries_mean_to_a_unit_norm_a():
    torch.manual_seed(0)
    generator = QFormerGenerator(USER + ITEM, HIDDEN, config(generator="published")).eval()
    collab = torch.randn(3, USER + ITEM)
    queries = generator.embed_norm(generator.query.expand(3, -1, -1))
    attended = generator.layers(queries, collab.unsqueeze(1))
    flat = generator.final(attended).mean(dim=1)
    want = (flat / flat.norm(dim=-1, keepdim=True)).view(3, HIDDEN, 4).transpose(1, 2)
    assert torch.allclose(generator(collab), want, atol=1e-6)
    assert generator.query.shape == (1, 2, USER + ITEM) and generator.query.abs().max() < 0.1
    assert len(generator.layers.layers) == 2 and generator.layers.layers[0].norm_first is False
    layer = generator.layers.layers[0]
    assert layer.linear1.out_features == 16 and layer.self_attn.num_heads == 2 and layer.dropout.p == 0.1
    assert generator.embed_norm.eps == 1e-12 and layer.norm1.eps == 1e-12 and generator.embed_dropout.p == 0.1
    assert layer.activation is F.gelu


def test_targets_are_found_through_peft_wrappers_and_named_in_errors():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleDict({"q_proj": Wrapped(), "v_proj": nn.Linear(HIDDEN, 4)})

    cora = CoRA(Model(), USER, ITEM, config())
    assert set(cora.lora_b) == {"layer__q_proj", "layer__v_proj"} and cora.lora_b["layer__q_proj"].shape == (4, 6)
    with pytest.raises(DiffRecError, match=r"^model.cora.target_modules: no module named k_proj, o_proj in Block$"):
        CoRA(Block(), USER, ITEM, config(target_modules=["q_proj", "o_proj", "k_proj"]))
    with pytest.raises(DiffRecError, match=r"^CoRA target GELU has no in_features: only linear layers can be targets$"):
        CoRA(Block(), USER, ITEM, config(target_modules=["q_proj", "act"]))

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(HIDDEN, 4), nn.Linear(HIDDEN + 1, 4)

    with pytest.raises(DiffRecError, match=r"need one input size; got \[8, 9\]$"):
        CoRA(Mixed(), USER, ITEM, config())


def test_a_forward_without_weights_or_with_another_batch_is_an_error():
    torch.manual_seed(0)
    block = Block()
    CoRA(block, USER, ITEM, config())
    with pytest.raises(
        DiffRecError, match=r"^CoRA weights are not set: call set_weights\(user, item\) before the forward$"
    ):
        block(torch.randn(2, 3, HIDDEN))
    block, cora = attached()
    cora.set_weights(torch.randn(2, USER), torch.randn(2, ITEM))
    with pytest.raises(DiffRecError, match=r"^CoRA weights were generated for 2 samples, the forward has 3$"):
        block(torch.randn(3, 5, HIDDEN))
