import dataclasses

import pytest
import torch

from moe.accounting import param_counts, train_flops_per_token
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.layer import MoELayer
from moe.model import Transformer

SMALL = ModelConfig(vocab_size=50, dim=32, n_layers=4, n_heads=4, seq_len=16, ffn_dim=64)
SMALL_MOE = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32)


@pytest.mark.parametrize(
    "model_kw, moe_kw",
    [
        ({}, {}),
        ({"moe_every": 2, "activation": "swiglu", "tie_embeddings": False}, {"activation": "swiglu", "num_shared_experts": 2}),
        ({"moe_every": 0}, {}),
        ({}, {"router": "sinkhorn", "aux_loss_coeff": 0.0}),
        ({}, {"router": "hash", "top_k": 1, "normalize_weights": False}),
        ({"n_kv_heads": 2, "head_dim": 12, "qk_norm": True, "moe_every": 2}, {}),
    ],
)
def test_param_counts_match_the_model(model_kw: dict, moe_kw: dict) -> None:
    cfg = dataclasses.replace(SMALL, **model_kw)
    moe = dataclasses.replace(SMALL_MOE, **moe_kw)
    model = Transformer(cfg, moe)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg, moe).total


def test_active_params_count_k_experts() -> None:
    counts = param_counts(SMALL, SMALL_MOE)
    per_expert = 2 * 32 * 32  # w_in [D, F] + w_out [F, D]
    assert counts.non_embedding_total - counts.non_embedding_active == 4 * (4 - 2) * per_expert


def test_flops_per_token_formula() -> None:
    dense = dataclasses.replace(SMALL, moe_every=0)
    d, f, v, s, layers = 32, 64, 50, 16, 4
    expected = 6 * (layers * (4 * d * d + 2 * d * f) + v * d) + 6 * layers * s * d
    assert train_flops_per_token(dense, SMALL_MOE) == expected


def test_flops_per_token_with_grouped_query_attention() -> None:
    """4 query heads of 12 sharing 2 key/value heads: qkv 32 -> (4+2+2)·12, out 48 -> 32;
    scores and values over 4·12 per key; the q/k norm gains are not matmul weights."""
    gqa = dataclasses.replace(SMALL, moe_every=0, n_kv_heads=2, head_dim=12, qk_norm=True)
    d, f, v, s, layers = 32, 64, 50, 16, 4
    attention = d * 8 * 12 + 48 * d
    expected = 6 * (layers * (attention + 2 * d * f) + v * d) + 6 * layers * s * 48
    assert train_flops_per_token(gqa, SMALL_MOE) == expected


def test_moe_every_places_moe_layers() -> None:
    model = Transformer(dataclasses.replace(SMALL, moe_every=2), SMALL_MOE)
    assert [isinstance(b.ffn, MoELayer) for b in model.blocks.values()] == [False, True, False, True]


def test_forward_shapes_and_losses() -> None:
    model = Transformer(SMALL, SMALL_MOE)
    ids = torch.randint(0, 50, (3, 16))
    out = model(ids, ids)
    assert out.logits_BSV.shape == (3, 16, 50)
    assert len(out.moe_stats) == 4
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    assert torch.allclose(out.aux_loss, sum(s.aux_loss for s in out.moe_stats))


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model = Transformer(SMALL, dataclasses.replace(SMALL_MOE, capacity_factor=None)).eval()
    ids = torch.randint(0, 50, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50
    assert torch.allclose(model(ids).logits_BSV[:, :10], model(changed).logits_BSV[:, :10], atol=1e-5)


def test_sequence_longer_than_context_is_rejected() -> None:
    with pytest.raises(ValueError, match="model.seq_len=16"):
        Transformer(SMALL, SMALL_MOE)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "model_kw, message",
    [
        ({"n_kv_heads": 3}, "model.n_kv_heads=3: must divide model.n_heads=4"),
        ({"n_kv_heads": 0}, "model.n_kv_heads=0: must divide model.n_heads=4"),
        ({"head_dim": 7}, "model.head_dim=7: must be even and >= 2: RoPE rotates pairs"),
        ({"n_heads": 5}, r"model.n_heads=5: must divide model.dim=32 \(or set model.head_dim\)"),
    ],
)
def test_attention_shape_is_validated(model_kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(SMALL, **model_kw)


def test_head_dim_frees_the_head_count_from_dim() -> None:
    """5 heads of 8 on a 32-wide model: q is 40 wide, the output projection maps 40 back to 32."""
    cfg = dataclasses.replace(SMALL, n_heads=5, head_dim=8, n_kv_heads=1)
    attn = Transformer(cfg, SMALL_MOE).blocks["0"].attn
    assert attn.qkv.weight.shape == ((5 + 2) * 8, 32) and attn.out.weight.shape == (32, 40)


STREAM_MODEL = ModelConfig(dim=32, n_layers=3, n_heads=2, seq_len=16, ffn_dim=64, vocab_size=64, moe_every=2)
STREAM_MOE = MoEConfig(num_experts=4, top_k=2, normalize_weights=True, expert_ffn_dim=32)


@pytest.mark.parametrize("moe_kw", [
    {}, {"router": "noisy_topk", "normalize_weights": False},
    {"router": "hash", "top_k": 1, "normalize_weights": False, "aux_loss_coeff": 0.0},
    {"score": "sigmoid", "num_shared_experts": 1, "granularity": 2},
], ids=["topk", "noisy-salt", "hash", "sigmoid-shared-fine"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_streamed_build_is_the_whole_models_init(moe_kw: dict, tie: bool) -> None:
    """``build_streamed`` (one piece at a time, as a training rank builds its share) gives
    every kept piece the whole model's values bit for bit, noisy top-k's construction-time
    salt included, and leaves the generator where the whole build does."""
    from moe.model import build_streamed

    model, moe = dataclasses.replace(STREAM_MODEL, tie_embeddings=tie), dataclasses.replace(STREAM_MOE, **moe_kw)
    torch.manual_seed(7)
    whole = Transformer(model, moe)
    after_whole = torch.get_rng_state()
    finished: list[str] = []
    keep = {"embed", "blocks.1", "norm", "lm_head"}
    torch.manual_seed(7)
    part = build_streamed(model, moe, keep.__contains__, lambda name, piece: finished.append(name))
    assert torch.equal(torch.get_rng_state(), after_whole)
    assert finished == ["embed", "blocks.1", "norm", "lm_head"] and list(part.blocks) == ["1"]
    reference = whole.state_dict()
    for name, value in part.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert part.blocks["1"].ffn.router.__dict__.get("noise_salt") == whole.blocks["1"].ffn.router.__dict__.get("noise_salt")
    assert (part.lm_head.weight is part.embed.weight) is tie
