"""``moe ckpt upcycle DENSE --experts E --top-k K [--granularity G] --out CKPT_DIR``: a dense
model made MoE with its function unchanged (sparse upcycling, Komatsuzaki et al. 2022; with
granularity, megatron-core's fine-grained upcycling).

``DENSE`` is a Hugging Face ``LlamaForCausalLM``/``Qwen3ForCausalLM`` directory or our
checkpoint (or run) of a dense model (``model.moe_every=0``). Every layer becomes an MoE
layer; attention, norms and embeddings are copied. It streams: the dense model is read one
piece (embedding, block, norm, LM head) at a time, upcycled, and written into the
checkpoint's reserved space (``hf_import.save_streamed``), so at most one block's experts
are held (a Mistral 7B made 8 experts is a 47B model: 188 GB in fp32).

**Construction.** Let the dense MLP be ``y = W_out · act(W_in · x)`` with F hidden units
(SwiGLU: F (gate, up) pairs). With granularity G the layer holds ``E·G`` experts of width
``F/G`` (``MoEConfig.fine_grained``) and routes each token to ``K·G`` of them. Cut the hidden
units into G contiguous slices ``s = 0..G-1``, ``h_s = [s·F/G, (s+1)·F/G)``; the dense MLP
is the sum of its slices, ``y = Σ_s W_out[:, h_s] · act(W_in[h_s] · x)`` (the activation
acts per hidden unit). Expert ``j`` is slice ``j mod G``: ``W_in^j = W_in[h_{j mod G}]``,
``W_out^j = c · W_out[:, h_{j mod G}]``. The router weight is zero, so every token's logits
are equal, its probabilities all ``1/(E·G)``, and the top-``K·G`` choice (ties to the lower
index: the stable sort of ``moe.kernels.gating``) takes experts ``0 .. K·G-1``: K·G
consecutive indices, which hold every slice exactly K times. Each chosen gate is
``g = 1/(K·G)`` when the gates are renormalised (``moe.normalize_weights``), else
``1/(E·G)``, so the layer's output is ``g · c · K · Σ_s slice_s(x) = g·c·K · y``, and
``c = 1/(g·K)`` makes it the dense output: ``c = G`` renormalised (1 at G = 1: plain copies,
the original upcycling), ``c = E·G/K`` otherwise. The first forward thus equals the dense
model's up to rounding of the gates (tests/test_upcycle.py: <= 1e-6); training then
breaks the symmetry through the router's gradient (the aux loss and the LM loss reach it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from launch.ckpt.full_state import open_model_state, piece_of
from launch.ckpt.hf_config import config_from_hf, read_hf_config
from launch.ckpt.hf_import import (
    Layout,
    check_tensors,
    copy_tokenizer,
    data_config,
    expected_shapes,
    prepare_out,
    save_streamed,
    table_layout,
    table_tensors,
    write_config,
)
from launch.ckpt.safetensors_io import SafetensorsReader
from launch.config import Config, build, to_dict
from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.hf_weights import HF_NAMES, weight_table
from parallel.checkpoint import CheckpointError


@dataclass(frozen=True)
class DenseSource:
    """A dense model, its tensors unread: ``layout`` (name -> shape, dtype; a tied LM head
    left out) and ``read`` (the named tensors, read now)."""

    model: ModelConfig
    origin: str
    layout: Layout
    read: Callable[[list[str]], dict[str, torch.Tensor]]


def _dense_from_hf(hf_dir: Path) -> DenseSource:
    hf, arch = read_hf_config(hf_dir)
    if HF_NAMES[arch].moe:
        raise CheckpointError(f"{hf_dir}: {arch} is already MoE; upcycle a dense LlamaForCausalLM or Qwen3ForCausalLM")
    model, moe, _ = config_from_hf(hf, arch)
    reader = SafetensorsReader(hf_dir)
    table = weight_table(arch, model, moe)
    check_tensors(reader, table, expected_shapes(model, moe), f"{hf_dir} ({arch})")
    return DenseSource(model, f"{hf_dir.resolve()} ({arch})", table_layout(reader, table),
                       lambda names: dict(table_tensors(reader, [e for e in table if e.ours in names])))


def _dense_from_ours(path: Path) -> DenseSource:
    state = open_model_state(path)
    model = build(ModelConfig, state.config["model"], "model")
    if model.moe_every != 0:
        raise CheckpointError(f"checkpoint {str(state.found)!r} has MoE layers (model.moe_every={model.moe_every}); upcycle a "
                              "dense model (model.moe_every=0)")
    kept = [n for n in state.shapes if not (n == "lm_head.weight" and model.tie_embeddings)]
    return DenseSource(model, str(state.found), {n: (torch.Size(state.shapes[n]), state.dtypes[n]) for n in kept},
                       state.read)


def upcycle_mlp(w_in_2FD: torch.Tensor, w_out_DF: torch.Tensor, moe: MoEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_in_EDF [E·G, D, 2F/G], w_out_EFD [E·G, F/G, D])`` of the construction in the module
    docstring, from a SwiGLU MLP's ``w_in [2F, D]`` (interleaved gate/up rows) and ``w_out [D, F]``."""
    g, experts = moe.granularity, moe.routed_experts
    width = w_out_DF.shape[1] // g
    scale = float(g) if moe.normalize_weights else experts / moe.top_k  # c = 1/(g·K), g the chosen gates
    # Rows 2u, 2u+1 of w_in are hidden unit u's (gate, up): slice s is rows [2·s·width, 2·(s+1)·width).
    slices_in = w_in_2FD.split(2 * width, dim=0)
    slices_out = w_out_DF.split(width, dim=1)
    w_in_EDF = torch.stack([slices_in[j % g].T for j in range(experts)]).contiguous()
    w_out = [slices_out[j % g].T for j in range(experts)]
    w_out_EFD = torch.stack(w_out if scale == 1.0 else [w * scale for w in w_out]).contiguous()
    return w_in_EDF, w_out_EFD


def upcycled_config(model: ModelConfig, experts: int, top_k: int, granularity: int) -> tuple[ModelConfig, MoEConfig]:
    """Every layer MoE; experts of the dense MLP's width and activation, split G ways."""
    try:
        moe = MoEConfig(num_experts=experts, top_k=top_k, granularity=granularity, expert_ffn_dim=model.ffn_dim,
                        activation=model.activation, normalize_weights=top_k * granularity > 1)
    except ConfigError as err:
        raise CheckpointError(f"moe ckpt upcycle: {err}") from None
    return replace(model, moe_every=1), moe


def upcycle_state(dense: dict[str, torch.Tensor], model: ModelConfig, moe: MoEConfig) -> dict[str, torch.Tensor]:
    """The MoE tensors of ``dense`` (the whole model or some of its pieces): each block's
    ``ffn.w_in``/``ffn.w_out`` become experts and a zero router; the rest is kept."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        if name.endswith("ffn.w_out.weight"):
            continue
        if not name.endswith("ffn.w_in.weight"):
            out[name] = tensor
            continue
        block = name.removesuffix("w_in.weight")
        w_in_EDF, w_out_EFD = upcycle_mlp(tensor, dense[block + "w_out.weight"], moe)
        out[block + "router.weight_ED"] = tensor.new_zeros(moe.routed_experts, model.dim)
        out[block + "experts.w_in_EDF"] = w_in_EDF
        out[block + "experts.w_out_EFD"] = w_out_EFD
    return out


def upcycled_layout(dense: DenseSource, model: ModelConfig, moe: MoEConfig) -> Layout:
    """The MoE tensors' shapes and dtypes: the construction run on meta tensors."""
    metas = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in dense.layout.items()}
    return {n: (t.shape, t.dtype) for n, t in upcycle_state(metas, model, moe).items()}


def upcycled_tensors(dense: DenseSource, model: ModelConfig, moe: MoEConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The MoE tensors, one piece of the dense model (embedding, block, norm, LM head) read
    and upcycled at a time: at most one block's experts are held."""
    pieces: dict[str, list[str]] = {}
    for name in dense.layout:
        pieces.setdefault(piece_of(name), []).append(name)
    for names in pieces.values():
        yield from upcycle_state(dense.read(names), model, moe).items()


def upcycle(source: Path, out: Path, experts: int, top_k: int, granularity: int = 1) -> dict[str, Any]:
    """Write the upcycled checkpoint of ``source`` (HF dense directory or our dense checkpoint) into ``out``."""
    if not source.exists():
        raise CheckpointError(f"{str(source)!r}: no such file or directory; give a dense HF model directory or checkpoint")
    is_hf = (source / "config.json").is_file()
    dense = _dense_from_hf(source) if is_hf else _dense_from_ours(source)
    model, origin = dense.model, dense.origin
    if granularity < 1 or model.ffn_dim % granularity:
        raise CheckpointError(f"--granularity {granularity} must be >= 1 and divide the dense MLP's width model.ffn_dim={model.ffn_dim}")
    new_model, moe = upcycled_config(model, experts, top_k, granularity)
    tmp = prepare_out(out)
    try:
        tmp.mkdir()
        tokenizer = copy_tokenizer(source, tmp) if is_hf else []
        named = (out / "tokenizer" / "tokenizer.json").resolve() if "tokenizer.json" in tokenizer else None
        cfg = Config(model=new_model, moe=moe, data=data_config(named))
        cfg = replace(cfg, train=replace(cfg.train, init_from=str(out.resolve())))
        notes = {"model.moe_every": "upcycled: every layer MoE", "moe.num_experts": "--experts",
                 "moe.top_k": "--top-k", "moe.granularity": "--granularity: each expert a 1/G slice of the dense MLP",
                 "moe.expert_ffn_dim": "the dense MLP's width (model.ffn_dim)",
                 "train.init_from": "these weights (a fresh run: step 0, new optimizer)"}
        source_note = f"upcycled from {origin}"
        save_streamed(tmp / "checkpoints", upcycled_layout(dense, new_model, moe), upcycled_tensors(dense, new_model, moe),
                      new_model.tie_embeddings, {"config": to_dict(cfg), "source": source_note})
        write_config(tmp, out, cfg, source_note, notes,
                     f"\nmoe ckpt upcycle --experts {experts} --top-k {top_k} --granularity {granularity}: zero router, "
                     "experts = dense MLP slices (launch/ckpt/upcycle.py)")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"source": origin, "experts": moe.routed_experts, "top_k": moe.top_k * granularity, "tokenizer": tokenizer}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="moe ckpt upcycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a dense HF model directory (Llama, Qwen3) or our dense checkpoint/run")
    parser.add_argument("--experts", type=int, required=True, help="experts E per layer (before granularity)")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token K (before granularity)")
    parser.add_argument("--granularity", type=int, default=1, help="G: each expert 1/G of the dense MLP; E*G experts, K*G chosen")
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the MoE checkpoint and config")
    args = parser.parse_args(argv)
    summary = upcycle(args.source, args.out, args.experts, args.top_k, args.granularity)
    print(f"upcycled {summary['source']}: {summary['experts']} experts per layer, {summary['top_k']} per token -> "
          f"{args.out}/ (config.yaml; train with train.init_from={str(args.out)!r})")
    return 0
