"""Our sigmoid router (expert bias, group-limited routing, routed scaling) and MoE layer with
shared experts against transformers' DeepSeek-V3 MoE block (``DeepseekV3MoE``), built from a
small ``DeepseekV3Config`` with random weights (nothing downloaded) and copied into ours:
the chosen experts are identical and the outputs equal to 1e-5 in fp32."""

from __future__ import annotations

import pytest
import torch

from moe.config import MoEConfig
from moe.hf_weights import experts_from_hf, fuse_gate_up
from moe.layer import MoELayer

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3  # noqa: E402

TOKENS, DIM, FFN, EXPERTS = 64, 32, 16, 16
TOL = 1e-5
# (n_group, topk_group, top_k, norm_topk_prob, routed_scaling_factor, n_shared_experts)
CASES = {
    "groups-4-of-8-top4-norm-2.5-shared1": (8, 4, 4, True, 2.5, 1),
    "groups-1-of-4-top2": (4, 1, 2, True, 1.0, 2),
    "no-groups-top3-raw-gates": (1, 1, 3, False, 1.5, 1),
}


def _blocks(case: tuple[int, int, int, bool, float, int], seed: int) -> tuple[torch.nn.Module, MoELayer]:
    n_group, topk_group, top_k, norm, scale, shared = case
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=DIM, moe_intermediate_size=FFN, n_routed_experts=EXPERTS, num_experts_per_tok=top_k,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale,
        n_shared_experts=shared, hidden_act="silu",
    )
    hf = modeling_deepseek_v3.DeepseekV3MoE(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        # A bias as large as the score spread: it changes many tokens' experts.
        hf.gate.e_score_correction_bias.copy_(0.2 * torch.randn(EXPERTS, generator=gen))
    ours = MoELayer(DIM, MoEConfig(
        num_experts=EXPERTS, top_k=top_k, score="sigmoid", n_groups=n_group, topk_groups=topk_group,
        normalize_weights=norm, routed_scaling_factor=scale, num_shared_experts=shared, expert_ffn_dim=FFN,
        activation="swiglu", kernels="torch", aux_loss_coeff=0.0, z_loss_coeff=0.0,
    )).eval()
    w_in, w_out = experts_from_hf(hf.experts.gate_up_proj.data, hf.experts.down_proj.data)
    ours.load_state_dict({
        "router.weight_ED": hf.gate.weight.data,
        "router.expert_bias_E": hf.gate.e_score_correction_bias.data,
        "experts.w_in_EDF": w_in,
        "experts.w_out_EFD": w_out,
        "shared.w_in.weight": fuse_gate_up(hf.shared_experts.gate_proj.weight.data, hf.shared_experts.up_proj.weight.data),
        "shared.w_out.weight": hf.shared_experts.down_proj.weight.data,
    })
    return hf, ours


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_layer_matches_deepseek_v3_block(case: tuple[int, int, int, bool, float, int]) -> None:
    hf, ours = _blocks(case, seed=len(CASES) + case[2])
    x_BSD = torch.randn(2, TOKENS // 2, DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, _, hf_experts_TK = hf.gate(x_BSD)
        routing = ours.router(x_BSD.reshape(-1, DIM))
        want_BSD = hf(x_BSD)
        got_BSD, _ = ours(x_BSD)
    assert torch.equal(routing.experts_TK.sort(dim=-1).values, hf_experts_TK.sort(dim=-1).values)
    assert (got_BSD - want_BSD).abs().max().item() <= TOL


def test_bias_and_groups_change_the_choice() -> None:
    """The comparison above would pass with the bias or the group mask ignored on both sides
    only if they did not matter: here both change many tokens' experts."""
    _, ours = _blocks(CASES["groups-4-of-8-top4-norm-2.5-shared1"], seed=3)
    x_TD = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        chosen = ours.router(x_TD).experts_TK.sort(dim=-1).values
        ours.router.n_groups = 1
        ungrouped = ours.router(x_TD).experts_TK.sort(dim=-1).values
        ours.router.expert_bias_E.zero_()
        unbiased = ours.router(x_TD).experts_TK.sort(dim=-1).values
    assert (chosen != ungrouped).any(dim=-1).sum() >= TOKENS // 4
    assert (ungrouped != unbiased).any(dim=-1).sum() >= TOKENS // 4
