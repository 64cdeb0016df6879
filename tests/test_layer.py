import dataclasses

import pytest
import torch

from moe.config import MoEConfig
from moe.layer import MoELayer
from moe.mlp import MLP


def _layer(**kw: object) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, **kw})
    layer = MoELayer(8, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_expert_top1_equals_dense_mlp(activation: str) -> None:
    cfg = MoEConfig(num_experts=1, top_k=1, normalize_weights=False, capacity_factor=1.0,
                    expert_ffn_dim=16, activation=activation)
    layer = MoELayer(8, cfg)
    mlp = MLP(8, 16, activation)
    with torch.no_grad():
        for p in mlp.parameters():
            torch.nn.init.normal_(p, std=0.3)
        layer.experts.w_in_EDF[0].copy_(mlp.w_in.weight.T)
        layer.experts.w_out_EFD[0].copy_(mlp.w_out.weight.T)
        torch.nn.init.normal_(layer.router.weight_ED)
    x1 = torch.randn(2, 5, 8, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y_moe, _ = layer(x1)
    y_mlp = mlp(x2)
    assert torch.allclose(y_moe, y_mlp, atol=1e-6)
    grad = torch.randn_like(y_mlp)
    y_moe.backward(grad)
    y_mlp.backward(grad)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)
    assert torch.allclose(layer.experts.w_in_EDF.grad[0], mlp.w_in.weight.grad.T, atol=1e-6)
    assert torch.allclose(layer.experts.w_out_EFD.grad[0], mlp.w_out.weight.grad.T, atol=1e-6)


def test_dropless_equals_large_capacity() -> None:
    dropless = _layer(capacity_factor=None)
    large = MoELayer(8, dataclasses.replace(dropless.cfg, capacity_factor=4.0))  # capacity = T*K
    large.load_state_dict(dropless.state_dict())
    x = torch.randn(3, 7, 8)
    y1, s1 = dropless(x)
    y2, s2 = large(x)
    assert torch.equal(y1, y2)
    assert s2.dropped_fraction.item() == 0.0


def test_dropped_tokens_pass_through_unchanged() -> None:
    layer = _layer(top_k=1, normalize_weights=False, capacity_factor=0.25, num_experts=2)
    with torch.no_grad():
        layer.router.weight_ED.zero_()
        layer.router.weight_ED[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 16, 8).abs()  # all tokens to expert 0; capacity ceil(.25*16/2) = 2
    y, stats = layer(x)
    y = y.squeeze(0)
    assert torch.count_nonzero(y.abs().sum(-1)).item() == 2
    assert torch.equal(y[2:], torch.zeros(14, 8))  # position policy: the first two are kept
    assert stats.dropped_fraction.item() == pytest.approx(14 / 16)


def test_router_gets_gradient_from_lm_loss_and_from_aux_loss() -> None:
    layer = _layer(top_k=2, aux_loss_coeff=0.01, z_loss_coeff=0.0)
    x = torch.randn(2, 6, 8)
    y, stats = layer(x)
    (g_task,) = torch.autograd.grad(y.square().sum(), layer.router.weight_ED, retain_graph=True)
    (g_aux,) = torch.autograd.grad(stats.aux_loss, layer.router.weight_ED)
    assert g_task.abs().sum() > 0
    assert g_aux.abs().sum() > 0


def test_switch_top1_router_gets_task_gradient() -> None:
    layer = _layer(top_k=1, normalize_weights=False, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    y, _ = layer(torch.randn(2, 6, 8))
    (g,) = torch.autograd.grad(y.square().sum(), layer.router.weight_ED)
    assert g.abs().sum() > 0


def test_shared_expert_is_added() -> None:
    layer = _layer(num_shared_experts=1)
    x = torch.randn(1, 4, 8)
    y, _ = layer(x)
    shared = layer.shared
    layer.shared = None
    y_routed, _ = layer(x)
    assert torch.allclose(y, y_routed + shared(x.reshape(4, 8)).reshape(1, 4, 8), atol=1e-6)


def test_stats_count_routed_assignments() -> None:
    layer = _layer(top_k=2)
    _, stats = layer(torch.randn(2, 5, 8))
    assert stats.tokens_per_expert_E.sum().item() == 2 * 5 * 2


def _split_mean(layer: MoELayer, x: torch.Tensor, load_E: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Aux loss and router grad as two half-batch forwards averaged (two DP ranks or two
    accumulated micro-batches)."""
    layer.zero_grad()
    halves = [layer(half, load_E)[1].aux_loss for half in x.chunk(2)]
    loss = (halves[0] + halves[1]) / 2
    loss.backward()
    return loss.detach(), layer.router.weight_ED.grad.clone()


@pytest.mark.parametrize("scope, invariant", [("sequence", True), ("global_batch", True), ("micro_batch", False)])
def test_aux_loss_scope_invariance_under_batch_splitting(scope: str, invariant: bool) -> None:
    layer = _layer(top_k=2, aux_loss_scope=scope, z_loss_coeff=0.0)
    x = torch.randn(4, 6, 8)
    layer.zero_grad()
    _, stats = layer(x)
    stats.aux_loss.backward()
    whole, whole_grad = stats.aux_loss.detach(), layer.router.weight_ED.grad.clone()
    load_E = stats.tokens_per_expert_E.float() / stats.tokens_per_expert_E.sum()  # the global f
    split, split_grad = _split_mean(layer, x, load_E if scope == "global_batch" else None)
    same = torch.allclose(whole, split, atol=1e-7) and torch.allclose(whole_grad, split_grad, atol=1e-7)
    assert same == invariant


@pytest.mark.parametrize("capacity_factor, top_k", [(None, 2), (1.0, 2), (0.5, 1)], ids=["dropless-k2", "capacity-k2", "drops-k1"])
def test_fused_kernels_equal_torch_path(capacity_factor: float | None, top_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole layer with moe.kernels=fused (Triton: compiled on a GPU, interpreted on CPU)
    against torch. On a CUDA machine the layers and input go to the GPU: conftest sets
    TRITON_INTERPRET only without CUDA, so CPU tensors there would take the torch path."""
    import moe.kernels.gating as gating
    import moe.kernels.permute as permute

    launched: list[str] = []
    for module, name in ((gating, "gating_forward_triton"), (permute, "permute_triton")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: (launched.append(_n), _k(*a, **kw))[1])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_layer = _layer(top_k=top_k, normalize_weights=top_k > 1, capacity_factor=capacity_factor, kernels="torch").to(device)
    fused_layer = MoELayer(8, dataclasses.replace(torch_layer.cfg, kernels="fused")).to(device)
    fused_layer.load_state_dict(torch_layer.state_dict())
    x = torch.randn(2, 9, 8, device=device)
    results = []
    for layer in (torch_layer, fused_layer):
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        (y.square().sum() + stats.aux_loss + stats.z_loss).backward()
        results.append((y, stats, xi.grad, layer.router.weight_ED.grad, layer.experts.w_in_EDF.grad))
    (y_t, s_t, gx_t, gr_t, ge_t), (y_f, s_f, gx_f, gr_f, ge_f) = results
    for got, want in ((y_f, y_t), (gx_f, gx_t), (gr_f, gr_t), (ge_f, ge_t), (s_f.aux_loss, s_t.aux_loss), (s_f.z_loss, s_t.z_loss)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(s_f.tokens_per_expert_E, s_t.tokens_per_expert_E)
    assert s_f.dropped_fraction.item() == s_t.dropped_fraction.item()
    assert sorted(set(launched)) == ["gating_forward_triton", "permute_triton"]  # the fused path ran
