"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks",
arXiv 1701.06538, Sec. 2.1 and Appendix A).

Legend: B sequences, S positions, T = B·S tokens, D model dim, E experts, K experts per token.

In training ``H(x)_i = (x·W_g)_i + ε_i·softplus((x·W_noise)_i)``, ``ε ~ N(0, 1)``; in
evaluation ``H = x·W_g``. A token's experts are the K largest of ``H`` and its gates the
softmax over those K values (``moe.normalize_weights`` does not apply: the gates sum to 1
by construction). Beside the Switch aux loss and the z-loss (over the clean logits
``x·W_g``), the router returns what the paper's two balancing losses need
(``moe.losses.importance_loss`` and ``load_loss``): the gates summed over tokens
(importance) and the smooth load, ``P(x, i) = Φ(((x·W_g)_i − kth_excluding(H(x), K, i)) /
softplus((x·W_noise)_i))`` summed over tokens, where ``kth_excluding(H, K, i)`` is the K-th
largest of ``H`` with component i left out (the (K+1)-th largest of ``H`` when i is among
the K chosen, else the K-th). Both carry gradient to ``W_g`` and ``W_noise``. In evaluation
the load is the assignment count (no noise, no gradient), as in the paper's code. Both
matrices start as every matrix of the model does (``N(0, model.init_std)``), where the paper
starts them at zero.

The noise does not depend on the layout. ``ε`` is drawn per sequence from a generator
seeded by a hash of (the router's salt, ``noise_step``, the sequence's token ids): row s of
the sequence's ``[S, E]`` draw is position s's noise. Every layout (data, expert, tensor,
pipeline parallel, any micro-batch size, activation recomputation, the global-batch
routing pre-pass) routes each sequence whole in one forward of the same step, so it
draws the same noise as one process on the same kind of device (a CUDA generator draws
other numbers than the CPU one from the same seed). The salt is drawn from the model's
initialisation RNG (``train.seed``; identical on every rank, which builds the model from
the same seed); ``noise_step`` is the training step, set by the trainer before each step
(:func:`set_noise_step`). Two identical sequences in one step get the same noise. Under
tensor parallelism a TP rank must hold whole sequences (``parallel/tensor_parallel.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.router import Routing


@dataclass(frozen=True, kw_only=True)
class NoisyRouting(Routing):
    """``Routing`` plus the noisy-gating statistics, both with gradient: ``gate_sum_E``
    (importance: the gates summed over tokens) and ``load_E`` (the smooth load estimate
    summed over tokens in training, the assignment counts in evaluation)."""

    gate_sum_E: torch.Tensor
    load_E: torch.Tensor


def sequence_noise(ids_BS: torch.Tensor, salt: int, step: int, num_experts: int) -> torch.Tensor:
    """``ε_TE ~ N(0, 1)``, each sequence's ``[S, E]`` from its own generator on ``ids_BS``'s
    device, seeded by BLAKE2b of ``(salt, step, the sequence's token ids)`` (see the module
    docstring). The seeds need the ids on the host (one copy of B·S ids per layer)."""
    device = ids_BS.device
    rows = ids_BS.detach().to("cpu", torch.int64).numpy()
    eps_BSE = torch.empty(rows.shape[0], rows.shape[1], num_experts, device=device)
    head = np.array([salt, step], dtype=np.int64).tobytes()
    for b, row in enumerate(rows):
        seed = int.from_bytes(hashlib.blake2b(head + row.tobytes(), digest_size=8).digest(), "little") >> 1
        gen = torch.Generator(device=device).manual_seed(seed)
        eps_BSE[b] = torch.randn(rows.shape[1], num_experts, generator=gen, device=device)
    return eps_BSE.reshape(-1, num_experts)


def kth_excluding(noisy_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[T, E]``: for each (token, i), the K-th largest of ``noisy_TE[t]`` with i left out:
    the (K+1)-th largest where i is among the K largest, else the K-th."""
    top_TK1 = noisy_TE.topk(top_k + 1, dim=-1).values
    in_top_TE = noisy_TE >= top_TK1[:, top_k - 1 : top_k]
    return torch.where(in_top_TE, top_TK1[:, top_k : top_k + 1], top_TK1[:, top_k - 1 : top_k])


def smooth_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``sum_x P(x, ·)`` with ``P(x, i) = Φ((clean_i − kth_excluding(H, K, i)) / std_i)``:
    the probability that expert i stays among the K chosen when only its own noise is
    redrawn (Shazeer et al. 2017, Appendix A). Differentiable in every input."""
    z_TE = (clean_TE - kth_excluding(noisy_TE, top_k)) / noise_std_TE
    return torch.special.ndtr(z_TE).sum(dim=0)


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating (see the module docstring): ``weight_ED`` is ``W_g``,
    ``noise_weight_ED`` is ``W_noise``. Runs in fp32, as ``TopKRouter``."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.noise_weight_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.top_k = top_k
        # From the initialisation RNG: the same on every rank and after a resume (the model
        # is rebuilt from train.seed); a plain int, not a tensor, so it is not checkpointed.
        self.noise_salt = int(torch.randint(2**62, ()))
        self.noise_step = 0

    def forward(self, x_TD: torch.Tensor, ids_BS: torch.Tensor | None) -> NoisyRouting:
        """``ids_BS``: the token ids of ``x_TD``'s sequences (row-major), which seed the noise;
        needed in training only."""
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            clean_TE = F.linear(x_TD, self.weight_ED.float())
            if not self.training:
                return self._gate(clean_TE, clean_TE, None)
            if ids_BS is None:
                raise ValueError("moe.router='noisy_topk' seeds its training noise by the token ids: pass ids_BS")
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight_ED.float()))
            eps_TE = sequence_noise(ids_BS, self.noise_salt, self.noise_step, clean_TE.shape[1])
            return self._gate(clean_TE, clean_TE + eps_TE * noise_std_TE, noise_std_TE)

    def _gate(self, clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor | None) -> NoisyRouting:
        num_experts = clean_TE.shape[1]
        top_TK, experts_TK = noisy_TE.topk(self.top_k, dim=-1)
        weights_TK = top_TK.softmax(dim=-1)
        counts_E = torch.bincount(experts_TK.flatten(), minlength=num_experts)
        if noise_std_TE is None:
            load_E = counts_E.float()
        else:
            load_E = smooth_load(clean_TE, noisy_TE, noise_std_TE, self.top_k)
        gates_TE = torch.zeros_like(clean_TE).scatter(1, experts_TK, weights_TK)
        return NoisyRouting(
            logits_TE=clean_TE,
            weights_TK=weights_TK,
            experts_TK=experts_TK,
            prob_sum_E=clean_TE.softmax(dim=-1).sum(dim=0),
            counts_E=counts_E,
            lse_sq_sum=clean_TE.logsumexp(dim=-1).square().sum(),
            gate_sum_E=gates_TE.sum(dim=0),
            load_E=load_E,
        )


def set_noise_step(routers: Iterable[nn.Module], step: int) -> None:
    """Give every noisy router the training step its noise is drawn for (others are skipped)."""
    for router in routers:
        if isinstance(router, NoisyTopKRouter):
            router.noise_step = step
