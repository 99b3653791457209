"""The adaptive fusion on its own: the conditioning it returns, the gate, and the preference standardisation."""

import torch

from minigpt4.diffusion.fusion import AdaptiveFusion

PREFERENCE, JOINT, POOLED, TOKENS, TEXT = 6, 10, 8, 3, 5


def fusion_and_inputs(seed: int = 0) -> tuple[AdaptiveFusion, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small fusion with trained-looking (non-zero) output layers, and a batch of 4."""
    torch.manual_seed(seed)
    fusion = AdaptiveFusion(PREFERENCE, JOINT, POOLED, tokens=TOKENS, hidden=16)
    with torch.no_grad():
        for layer in (fusion.to_tokens, fusion.to_pooled):
            layer.weight.normal_()
            layer.bias.normal_()
    return fusion, torch.randn(4, TEXT, JOINT), torch.randn(4, POOLED), torch.randn(4, PREFERENCE)


def test_conditioning_keeps_the_text_and_appends_preference_tokens():
    """prompt_embeds = the text tokens, then K preference tokens; pooled = text pooled + alpha x shift."""
    fusion, text, pooled, preference = fusion_and_inputs()
    fused = fusion(text, pooled, preference)
    assert fused.prompt_embeds.shape == (4, TEXT + TOKENS, JOINT) and fused.pooled_prompt_embeds.shape == (4, POOLED)
    assert torch.equal(fused.prompt_embeds[:, :TEXT], text)
    hidden = fusion.preference(preference)
    tokens = fusion.to_tokens(hidden).view(4, TOKENS, JOINT) * fused.alpha[:, None, None]
    assert torch.allclose(fused.prompt_embeds[:, TEXT:], tokens, atol=1e-6)
    assert torch.allclose(
        fused.pooled_prompt_embeds, pooled + fusion.to_pooled(hidden) * fused.alpha[:, None], atol=1e-6
    )


def test_gate_is_per_sample_in_zero_one_and_reads_preference_and_text():
    """alpha = sigmoid(MLP(preference, normalised pooled text)): one value per sample, moved by either input."""
    fusion, text, pooled, preference = fusion_and_inputs()
    alpha = fusion(text, pooled, preference).alpha
    assert alpha.shape == (4,) and ((alpha > 0) & (alpha < 1)).all() and alpha.unique().numel() == 4
    hidden = fusion.preference(preference)
    expected = torch.sigmoid(fusion.gate(torch.cat([hidden, fusion.gate_text_norm(pooled)], dim=-1))).squeeze(-1)
    assert torch.allclose(alpha, expected)
    assert torch.allclose(fusion(text, pooled * 3 + 1, preference).alpha, alpha, atol=1e-5)  # normalised text
    assert not torch.allclose(fusion(text, pooled.flip(0), preference).alpha, alpha)
    assert not torch.allclose(fusion(text, pooled, preference.flip(0)).alpha, alpha)


def test_alpha_zero_is_the_same_text_only_conditioning_for_every_user():
    """Forcing the gate to 0 removes the preference: two different users get identical conditioning."""
    fusion, text, pooled, preference = fusion_and_inputs()
    zero = fusion(text, pooled, preference, alpha_override=0.0)
    other = fusion(text, pooled, torch.randn(4, PREFERENCE) * 5, alpha_override=0.0)
    assert torch.equal(zero.alpha, torch.zeros(4))
    assert torch.equal(zero.prompt_embeds, other.prompt_embeds) and torch.equal(zero.pooled_prompt_embeds, pooled)
    assert torch.equal(zero.prompt_embeds[:, TEXT:], torch.zeros(4, TOKENS, JOINT))
    full = fusion(text, pooled, preference, alpha_override=1.0)
    assert torch.equal(full.alpha, torch.ones(4))
    assert not torch.equal(
        full.prompt_embeds, fusion(text, pooled, preference.flip(0), alpha_override=1.0).prompt_embeds
    )


def test_output_layers_start_small_so_training_starts_near_the_text_only_conditioning():
    """Fresh to_tokens / to_pooled: zero biases and weights of std 0.02."""
    torch.manual_seed(0)
    fusion = AdaptiveFusion(PREFERENCE, 64, 64, tokens=TOKENS, hidden=256)
    for layer in (fusion.to_tokens, fusion.to_pooled):
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert 0.015 < layer.weight.std().item() < 0.025


def test_standardisation_centres_and_scales_by_the_training_preferences():
    """After standardize_with, a preference is read as (p - mean) / std; identity before."""
    fusion, text, pooled, preference = fusion_and_inputs()
    assert torch.equal(fusion.preference_mean, torch.zeros(PREFERENCE))
    assert torch.equal(fusion.preference_std, torch.ones(PREFERENCE))
    before = fusion(text, pooled, preference)
    training = torch.randn(50, PREFERENCE) * 4 + 7
    fusion.standardize_with(training)
    assert torch.allclose(fusion.preference_mean, training.mean(0)) and torch.allclose(
        fusion.preference_std, training.std(0)
    )
    after = fusion(text, pooled, preference * training.std(0) + training.mean(0))
    assert torch.allclose(after.prompt_embeds, before.prompt_embeds, atol=1e-5)
    constant = torch.ones(10, PREFERENCE)
    fusion.standardize_with(constant)  # a dimension with no spread is not divided by zero
    assert torch.isfinite(fusion(text, pooled, preference).prompt_embeds).all()
    assert (fusion.preference_std == 1e-6).all()
    assert set(fusion.state_dict()) >= {"preference_mean", "preference_std"}  # saved with the weights


def test_the_conditioning_keeps_the_text_dtype():
    """bf16 text embeddings stay bf16 after fusion (the pipeline's dtype), the gate in the fusion's own."""
    fusion, text, pooled, preference = fusion_and_inputs()
    fused = fusion(text.bfloat16(), pooled.bfloat16(), preference)
    assert fused.prompt_embeds.dtype == fused.pooled_prompt_embeds.dtype == torch.bfloat16
    assert fused.alpha.dtype == torch.float32


def test_defaults_and_nonlinearities():
    """4 preference tokens from a 256-wide hidden layer by default; the preference is layer-normalised (its
    per-sample scale and offset do not matter) and passed through SiLU; the gate is not affine in its input."""
    fusion = AdaptiveFusion(PREFERENCE, JOINT, POOLED)
    assert fusion.tokens == 4 and fusion.to_tokens.in_features == 256 and fusion.to_tokens.out_features == 4 * JOINT
    fusion, text, pooled, preference = fusion_and_inputs()
    scaled = fusion(text, pooled, preference * 7 + 3)
    assert torch.allclose(scaled.prompt_embeds, fusion(text, pooled, preference).prompt_embeds, atol=1e-4)
    assert fusion.preference(torch.randn(256, PREFERENCE) * 10).min() >= -0.2785  # SiLU's minimum
    z1, z2 = torch.randn(1, 16 + POOLED), torch.randn(1, 16 + POOLED)
    assert not torch.allclose(fusion.gate(z1) + fusion.gate(z2), 2 * fusion.gate((z1 + z2) / 2), atol=1e-4)


def test_a_bf16_fusion_forces_its_gate_in_bf16():
    """A forced alpha takes the fusion's own dtype, so a bf16 fusion's conditioning stays bf16."""
    fusion, text, pooled, preference = fusion_and_inputs()
    fusion = fusion.to(torch.bfloat16)
    forced = fusion(text.bfloat16(), pooled.bfloat16(), preference, alpha_override=0.5)
    assert forced.alpha.dtype == torch.bfloat16 and forced.prompt_embeds.dtype == torch.bfloat16
