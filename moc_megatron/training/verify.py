"""--verify of the Hugging Face export: the merged training model and the exported model must score
the same random batch (max |logit difference| <= 1e-4 in fp32), and the export is checked for
causality (future tokens must not change past logits; the paper's sequence routing fails this)."""

from __future__ import annotations

import torch

from moc_megatron.config import from_dict
from moc_megatron.errors import UserError

TOLERANCE = 1e-4


def training_model(cfg_dict: dict, state: dict):
    """The merged state dict in a single-process MoCModel (fp32, eval mode)."""
    from moc_megatron.model.gpt import MoCModel
    from moc_megatron.parallel.state import single_process

    cfg = from_dict({k: dict(v) for k, v in cfg_dict.items()})
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.expert_model_parallel_size = 1
    cfg.model.vocab_size = state["embed_tokens.weight"].shape[0]  # the rows padded for the checkpoint's TP size
    model = MoCModel(cfg.resolve(), single_process())
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"merged checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


@torch.no_grad()
def verify_export(cfg_dict: dict, state: dict, out_dir, batch: int = 2, seq: int | None = None) -> float:
    from transformers import AutoModelForCausalLM

    model = training_model(cfg_dict, state)
    seq = seq or min(cfg_dict["training"]["seq_length"], 256)
    tokens = torch.randint(0, cfg_dict["model"]["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ours = model(tokens).logits.float()
    theirs = hf(tokens).logits.float()[..., : ours.shape[-1]]
    diff = (ours - theirs).abs().max().item()
    print(f"verify: max |logit difference| training vs Hugging Face = {diff:.3e} (tolerance {TOLERANCE:g})")
    if diff > TOLERANCE:
        raise UserError(f"verify failed: exported logits differ by {diff:.3e} > {TOLERANCE:g}")
    report_causality(hf, tokens, cfg_dict)
    return diff


def report_causality(hf, tokens, cfg_dict) -> bool:
    """Perturb the tokens after position t; logits at <= t must not move."""
    t = tokens.shape[1] // 2
    perturbed = tokens.clone()
    perturbed[:, t + 1:] = (perturbed[:, t + 1:] + 1) % cfg_dict["model"]["vocab_size"]
    leak = (hf(tokens).logits[:, : t + 1] - hf(perturbed).logits[:, : t + 1]).abs().max().item()
    routing = cfg_dict["memory"].get("routing_unit", "sequence") if cfg_dict["memory"]["layers"] else "none"
    if leak == 0.0:
        print(f"verify: causal (future tokens leave past logits unchanged; routing: {routing})")
    else:
        print(f"verify: NOT causal: future tokens move past logits by up to {leak:.3e} (routing: {routing}; "
              "the paper's sequence routing sees the future, use --memory-routing-unit chunk)")
    return leak == 0.0
