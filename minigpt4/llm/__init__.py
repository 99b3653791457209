"""The LLM side: loading a causal LM, prompts, Yes/No scoring, and the three ways collaborative
knowledge reaches it (text only with LoRA, embeddings as tokens, per-sample LoRA weights)."""
