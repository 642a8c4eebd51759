"""Shared fixtures: the real default model (loaded once) and tiny random models of other families."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# Without CUDA, Triton kernels run under the interpreter. Triton reads the variable when it is
# first imported (transformers imports it through torch._dynamo), so it is set before anything else.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from headvis.models import DEFAULT_MODEL, load_model


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model (SmolLM2-135M, real weights), float32 on the CPU."""
    return load_model(DEFAULT_MODEL, device="cpu")


TINY_CONFIGS = {
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, n_positions=128),
    "gpt_neox": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                     max_position_embeddings=128, rotary_pct=0.5),
    "bert": dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                 max_position_embeddings=128),
    "llama": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=64, max_position_embeddings=128, head_dim=8, initializer_range=0.5),
    "granite_swa": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.5),  # sinks
    "gpt_oss": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                    intermediate_size=32, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                    max_position_embeddings=128, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),  # a tp plan that leaves attention whole
    "mistral": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                    intermediate_size=64, max_position_embeddings=128, sliding_window=5, head_dim=8),
    "gemma2": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32,
                   intermediate_size=64, max_position_embeddings=128, head_dim=8, sliding_window=6,
                   attn_logit_softcapping=2.0, query_pre_attn_scalar=16),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm):
    """arch -> a saved tiny random model of that family, with the SmolLM2 tokenizer."""
    from transformers import AutoConfig, AutoModel

    made = {}

    def make(arch: str):
        if arch not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            config = AutoConfig.for_model(arch, vocab_size=len(smollm.tokenizer), **TINY_CONFIGS[arch])
            torch.manual_seed(0)
            model = AutoModel.from_config(config)
            with torch.no_grad():  # attention sinks start at 0 in every head: give each head its own
                for name, param in model.named_parameters():
                    if name.endswith("self_attn.sinks"):
                        param.copy_(torch.linspace(-2.0, 3.0, param.numel()))
            model.save_pretrained(path)
            smollm.tokenizer.save_pretrained(path)
            made[arch] = path
        return made[arch]

    return make
