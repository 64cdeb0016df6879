"""transformers' ``config.json`` against our ``model``/``moe`` config, both ways.

Conventions that differ (each written into the imported YAML beside its key):

- ``router_aux_loss_coef``: transformers' load-balancing loss (Switch/Mixtral,
  ``load_balancing_loss_func``) counts each token's K assignments with f normalised by T
  alone, ours (megatron-core's) by T·K, so at the same coefficient HF's loss is K× ours:
  ``moe.aux_loss_coeff = K · router_aux_loss_coef`` gives the same loss. transformers also
  pools f and P over all layers before multiplying, where we sum per-layer losses, and adds
  it only when ``output_router_logits`` is set; neither changes the forward.
- ``norm_topk_prob`` (Qwen3-MoE) is ``moe.normalize_weights``; Mixtral always renormalises.
- ``decoder_sparse_step``/``mlp_only_layers`` (Qwen3-MoE): layer i is MoE when
  ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``; ours when
  ``(i + 1) % moe_every == 0``. A pattern no ``moe_every`` gives is refused.
- ``intermediate_size`` is the dense MLP's width (Qwen3-MoE's dense layers, Llama, Qwen3)
  or, in Mixtral, every expert's; Qwen3-MoE's experts have ``moe_intermediate_size``.
- RoPE: ``rope_parameters.rope_theta`` (or the older top-level ``rope_theta``), default
  rope type only (no scaling); ``rms_norm_eps`` is ``model.norm_eps``; Qwen3 and Qwen3-MoE
  always have the per-head q/k RMSNorm (``model.qk_norm``), Llama and Mixtral never.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moe.config import ConfigError, ModelConfig, MoEConfig
from moe.hf_weights import HF_NAMES
from parallel.checkpoint import CheckpointError

QK_NORM = {"MixtralForCausalLM": False, "Qwen3MoeForCausalLM": True, "LlamaForCausalLM": False, "Qwen3ForCausalLM": True}
MODEL_TYPE = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe", "LlamaForCausalLM": "llama",
              "Qwen3ForCausalLM": "qwen3"}
# The imported config's context length: HF's max_position_embeddings, capped (a training choice).
MAX_SEQ_LEN = 4096
# MoEConfig keys a transformers config states or that only shape training (losses, jitter,
# kernels); every other key must keep its default to be expressible.
EXPRESSED_MOE_KEYS = frozenset({"num_experts", "top_k", "normalize_weights", "expert_ffn_dim", "activation",
                                "aux_loss_coeff", "aux_loss_scope", "z_loss_coeff", "jitter_eps", "kernels",
                                "drop_policy"})


def read_hf_config(hf_dir: Path) -> tuple[dict[str, Any], str]:
    """``(config.json, architecture)`` of a Hugging Face model directory; refuses anything else."""
    if not hf_dir.is_dir():
        raise CheckpointError(f"{str(hf_dir)!r} is not a directory; give a Hugging Face model directory (config.json + *.safetensors)")
    file = hf_dir / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{str(hf_dir)!r} is not a Hugging Face model directory: it has no config.json")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(file)!r} is not valid JSON ({err}); restore it from the model's source") from None
    archs = hf.get("architectures") if isinstance(hf, dict) else None
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in HF_NAMES:
        raise CheckpointError(
            f"{str(file)!r}: architectures={archs!r} is not supported; moe ckpt import reads "
            f"{', '.join(HF_NAMES)}"
        )
    return hf, archs[0]


def _refuse(arch: str, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{arch}: {what} cannot be expressed in our model ({fix})")


def _rope_theta(hf: dict[str, Any], arch: str) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = rope.get("rope_type", "default")
    if kind != "default" or scaling:
        raise _refuse(arch, f"rope_type={kind!r} / rope_scaling={scaling!r}", "only unscaled RoPE is implemented")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _moe_every(hf: dict[str, Any], arch: str) -> int:
    """``model.moe_every`` giving the same MoE layers as Qwen3-MoE's step and exceptions."""
    n = hf["num_hidden_layers"]
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    theirs = [i not in dense and step > 0 and (i + 1) % step == 0 for i in range(n)]
    for every in range(n + 1):
        if theirs == [every > 0 and (i + 1) % every == 0 for i in range(n)]:
            return every
    raise _refuse(arch, f"MoE layers {[i for i, m in enumerate(theirs) if m]} (decoder_sparse_step={step}, "
                  f"mlp_only_layers={sorted(dense)})", "model.moe_every makes layer i MoE when (i+1) % moe_every == 0")


def _check_common(hf: dict[str, Any], arch: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(arch, f"hidden_act={hf['hidden_act']!r}", "the MLPs and experts are SwiGLU: silu only")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(arch, f"{key}=true", "our projections have no biases")
    if hf.get("use_sliding_window") or (arch == "MixtralForCausalLM" and hf.get("sliding_window")):
        raise _refuse(arch, f"sliding_window={hf.get('sliding_window')!r}", "attention is full causal")


def config_from_hf(hf: dict[str, Any], arch: str) -> tuple[ModelConfig, MoEConfig, dict[str, str]]:
    """Our ``(model, moe)`` config of a transformers config, and, per ``section.key``, the
    comment saying where its value came from."""
    _check_common(hf, arch)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    is_moe = HF_NAMES[arch].moe
    every = (_moe_every(hf, arch) if arch == "Qwen3MoeForCausalLM" else 1) if is_moe else 0
    top_k = hf.get("num_experts_per_tok", MoEConfig.top_k)
    aux = hf.get("router_aux_loss_coef", 0.0)
    normalize = True if arch == "MixtralForCausalLM" else bool(hf.get("norm_topk_prob", False))
    try:
        model = ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim, qk_norm=QK_NORM[arch],
            seq_len=min(hf.get("max_position_embeddings", MAX_SEQ_LEN), MAX_SEQ_LEN), ffn_dim=hf["intermediate_size"],
            activation="swiglu", moe_every=every, norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(hf, arch), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )
        moe = MoEConfig(
            num_experts=hf.get("num_local_experts") or hf.get("num_experts") or MoEConfig.num_experts,
            top_k=top_k, normalize_weights=normalize, jitter_eps=hf.get("router_jitter_noise", 0.0),
            aux_loss_coeff=top_k * aux, z_loss_coeff=0.0,
            expert_ffn_dim=hf.get("moe_intermediate_size") or hf["intermediate_size"], activation="swiglu",
        ) if is_moe else MoEConfig(expert_ffn_dim=hf["intermediate_size"], activation="swiglu")
    except ConfigError as err:
        raise CheckpointError(f"{arch}: config.json maps to an invalid config: {err}") from None
    except KeyError as err:
        raise CheckpointError(f"{arch}: config.json lacks {err.args[0]!r}, which the architecture needs") from None
    return model, moe, _comments(hf, arch, is_moe, top_k, aux)


def _comments(hf: dict[str, Any], arch: str, is_moe: bool, top_k: int, aux: float) -> dict[str, str]:
    notes = {
        "model.vocab_size": "vocab_size", "model.dim": "hidden_size", "model.n_layers": "num_hidden_layers",
        "model.n_heads": "num_attention_heads", "model.n_kv_heads": "num_key_value_heads (grouped-query attention)",
        "model.head_dim": "head_dim", "model.qk_norm": f"{arch} {'has' if QK_NORM[arch] else 'has no'} per-head q/k RMSNorm",
        "model.seq_len": f"max_position_embeddings={hf.get('max_position_embeddings')} capped at {MAX_SEQ_LEN} for training",
        "model.ffn_dim": "intermediate_size (dense MLP layers)", "model.activation": "hidden_act=silu: SwiGLU",
        "model.norm_eps": "rms_norm_eps", "model.rope_theta": "rope_parameters.rope_theta (unscaled RoPE)",
        "model.tie_embeddings": "tie_word_embeddings", "model.init_std": "initializer_range (used only for new weights)",
    }
    if not is_moe:
        notes["model.moe_every"] = f"{arch} is dense: 0 (moe ckpt upcycle makes it MoE)"
        return notes
    notes |= {
        "model.moe_every": ("Mixtral: every layer is MoE" if arch == "MixtralForCausalLM" else
                            f"decoder_sparse_step={hf.get('decoder_sparse_step', 1)}, mlp_only_layers="
                            f"{hf.get('mlp_only_layers') or []}: layer i MoE when (i+1) % moe_every == 0"),
        "moe.num_experts": "num_local_experts" if arch == "MixtralForCausalLM" else "num_experts",
        "moe.top_k": "num_experts_per_tok",
        "moe.normalize_weights": "Mixtral renormalises its top-k gates" if arch == "MixtralForCausalLM" else "norm_topk_prob",
        "moe.jitter_eps": "router_jitter_noise (training only)",
        "moe.aux_loss_coeff": (f"num_experts_per_tok ({top_k}) x router_aux_loss_coef ({aux}): HF's aux loss is K x ours "
                               "at the same coefficient (ours normalises f by T*K, HF's by T); HF also pools f, P over "
                               "layers, we sum per-layer losses"),
        "moe.z_loss_coeff": "transformers has no router z-loss: 0",
        "moe.expert_ffn_dim": "intermediate_size" if arch == "MixtralForCausalLM" else "moe_intermediate_size",
        "moe.activation": "hidden_act=silu: SwiGLU experts",
    }
    return notes


def check_expressible(model: ModelConfig, moe: MoEConfig, arch: str) -> None:
    """Refuse, naming every feature, a config ``arch`` cannot express."""
    problems = []
    if model.qk_norm != QK_NORM[arch]:
        problems.append(f"model.qk_norm={model.qk_norm} ({arch} {'always has' if QK_NORM[arch] else 'has no'} q/k norms)")
    is_moe = HF_NAMES[arch].moe
    if (model.moe_every == 0) == is_moe:
        problems.append(f"model.moe_every={model.moe_every} ({arch} is {'an MoE' if is_moe else 'a dense'} architecture)")
    if model.moe_every != 1 and model.activation != "swiglu":
        problems.append(f"model.activation={model.activation!r} (dense MLPs are SwiGLU)")
    if is_moe:
        if arch == "MixtralForCausalLM" and model.moe_every != 1:
            problems.append(f"model.moe_every={model.moe_every} (Mixtral has experts in every layer; Qwen3-MoE can skip layers)")
        if arch == "MixtralForCausalLM" and not moe.normalize_weights:
            problems.append("moe.normalize_weights=false (Mixtral always renormalises its top-k gates)")
        if moe.activation != "swiglu":
            problems.append(f"moe.activation={moe.activation!r} (experts are SwiGLU)")
        defaults = MoEConfig()
        problems += [f"moe.{f.name}={getattr(moe, f.name)!r} (only {getattr(defaults, f.name)!r})"
                     for f in dataclasses.fields(MoEConfig)
                     if f.name not in EXPRESSED_MOE_KEYS and getattr(moe, f.name) != getattr(defaults, f.name)]
    if problems:
        raise CheckpointError(f"{arch} cannot express this checkpoint's " + "; ".join(problems) +
                              "; export another architecture (--arch) or train without the feature")


def default_architecture(model: ModelConfig) -> str:
    """Qwen3(-MoE) when the heads have q/k norms, Mixtral/Llama otherwise; dense when moe_every=0."""
    if model.moe_every == 0:
        return "Qwen3ForCausalLM" if model.qk_norm else "LlamaForCausalLM"
    return "Qwen3MoeForCausalLM" if model.qk_norm else "MixtralForCausalLM"


def hf_config(model: ModelConfig, moe: MoEConfig, arch: str, dtype: str) -> dict[str, Any]:
    """transformers' ``config.json`` of ``arch`` for our config (``check_expressible`` first)."""
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": MODEL_TYPE[arch], "vocab_size": model.vocab_size,
        "hidden_size": model.dim, "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads, "head_dim": model.head_size, "hidden_act": "silu",
        "max_position_embeddings": model.seq_len, "initializer_range": model.init_std, "rms_norm_eps": model.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "tie_word_embeddings": model.tie_embeddings, "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
        "intermediate_size": moe.expert_ffn_dim if arch == "MixtralForCausalLM" else model.ffn_dim,
    }
    if arch != "MixtralForCausalLM":
        out |= {"attention_bias": False}
    if arch == "LlamaForCausalLM":
        out |= {"mlp_bias": False}
    if HF_NAMES[arch].moe:
        out |= {"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coeff / moe.top_k,
                "output_router_logits": False}
    if arch == "MixtralForCausalLM":
        out |= {"num_local_experts": moe.num_experts, "router_jitter_noise": moe.jitter_eps, "sliding_window": None}
    if arch == "Qwen3MoeForCausalLM":
        out |= {"num_experts": moe.num_experts, "moe_intermediate_size": moe.expert_ffn_dim,
                "decoder_sparse_step": model.moe_every, "mlp_only_layers": [], "norm_topk_prob": moe.normalize_weights,
                "use_sliding_window": False, "sliding_window": None}
    return out
