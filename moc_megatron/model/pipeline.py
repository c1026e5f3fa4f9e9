"""The MoC model as a DeepSpeed PipelineModule (SPEC 2.1, pipeline parallel).

Layer list:  embed (tied "embed") | [bank pass-through (tied "bank{j}")] block 0 | ... | norm | head (tied "embed")

The embedding and the output head are one tied module on the first and last stage. Each bank is a
tied module on every stage that holds a memory block reading it, so DeepSpeed sums its gradients
over those stages. Memory blocks find their bank after the stage is built (the pass-through spec
just in front of them makes it exist on that stage). Router losses ride on the activations
(AttachAuxLoss) instead of travelling between stages, as megatron-core's MoEAuxLossAutoScaler does.
Stages are balanced by FLOPs, memory blocks weighted by their extra cost.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from moc_megatron.accounting import estimate_flops
from moc_megatron.config import Config
from moc_megatron.model.gpt import Block, SeededBank, bank_index, build_embedding, lm_loss, tied_logits
from moc_megatron.model.layers import RMSNorm
from moc_megatron.model.memory import router_losses
from moc_megatron.parallel.state import ParallelContext


class AttachAuxLoss(torch.autograd.Function):
    """Forward returns h unchanged; backward also starts aux's backward with gradient ``scale``
    (1 / gradient-accumulation steps, as the engine scales the main loss)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, h, aux):
        ctx.save_for_backward(aux)
        return h

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, AttachAuxLoss.scale)


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: Config, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.embed_tokens = build_embedding(cfg, ctx)

    def forward(self, inputs):
        tokens, valid = inputs
        return self.embed_tokens(tokens), valid


def head_forward(embedding: EmbeddingPipe, h):
    return tied_logits(h, embedding.embed_tokens.weight, embedding.ctx)


def bank_passthrough(bank, inputs):
    return inputs


class BlockPipe(Block):
    """A block whose bank (a tied module of the stage) is wired in after the stage is built."""

    def __init__(self, ctx: ParallelContext, cfg: Config, layer_idx: int):
        super().__init__(ctx, cfg, layer_idx)
        self.cfg = cfg
        self.aux_values: list[dict] = []  # router losses of the last forward, for logging

    def forward(self, inputs):
        h, valid = inputs
        bank = self.__dict__.get("bank_ref")
        h, routing = super().forward(h, bank, valid)
        if routing is not None:
            h = AttachAuxLoss.apply(h, self._aux(routing))
        return h, valid

    def _aux(self, routing):
        mem = self.cfg.memory
        losses = router_losses(routing, self.cfg, self.memory.ctx.dp_group)
        self.aux_values.append({k: v.detach() for k, v in losses.items()})
        weighted = mem.load_balance_coeff * losses["load_balance_loss"] + mem.z_loss_coeff * losses["z_loss"]
        return weighted / len(mem.layers)  # the model averages aux losses over memory layers


class FinalNormPipe(RMSNorm):
    def forward(self, inputs):
        return super().forward(inputs[0])


class MoCPipeline(PipelineModule):
    """PipelineModule whose stages are balanced by FLOPs and keep each bank next to its blocks."""

    def __init__(self, cfg: Config, ctx: ParallelContext):
        self.cfg = cfg
        self.unit_costs, self.unit_specs = [], []
        topology = PipeModelDataParallelTopology(num_pp=ctx.pp_size, num_mp=ctx.tp_size, num_dp=ctx.dp_size)
        super().__init__(self._specs(cfg, ctx), topology=topology, loss_fn=pipeline_loss,
                         partition_method="moc_flops")
        self._wire_banks()

    def _specs(self, cfg: Config, ctx: ParallelContext):
        """Layer specs, recorded as units (lists of consecutive specs that must share a stage)."""
        cost = block_costs(cfg)
        m = cfg.model
        bank_attrs = ["routed"] + (["shared"] if cfg.memory.shared_chapters else [])
        unit: list = []
        for name in spec_layout(cfg):
            if name == "embed":
                self._unit([TiedLayerSpec("embed", EmbeddingPipe, cfg, ctx, tied_weight_attr=["embed_tokens.weight"])], 0.0)
            elif name.startswith("banks."):
                j = int(name.split(".")[1])
                unit = [TiedLayerSpec(f"bank{j}", SeededBank, cfg, ctx, j, forward_fn=bank_passthrough,
                                      tied_weight_attr=bank_attrs)]
            elif name.startswith("layers."):
                i = int(name.split(".")[1])
                kind = "block" if bank_index(cfg, i) is None else "memory_block"
                self._unit(unit + [LayerSpec(BlockPipe, ctx, cfg, i)], cost[kind])
                unit = []
            elif name == "norm":
                unit = [LayerSpec(FinalNormPipe, m.hidden_size, m.norm_epsilon)]
            else:  # head
                self._unit(unit + [TiedLayerSpec("embed", EmbeddingPipe, cfg, ctx, forward_fn=head_forward,
                                                 tied_weight_attr=["embed_tokens.weight"])], cost["head"])
        return [spec for u in self.unit_specs for spec in u]

    def _unit(self, specs, cost):
        self.unit_specs.append(specs)
        self.unit_costs.append(cost)

    def _partition_layers(self, method="moc_flops"):
        """Balance units by FLOPs, then translate unit boundaries into spec boundaries."""
        unit_parts = ds_utils.partition_balanced(weights=self.unit_costs, num_parts=self.num_stages)
        first_spec = [0]
        for unit in self.unit_specs:
            first_spec.append(first_spec[-1] + len(unit))
        self.parts = [first_spec[u] for u in unit_parts]
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _wire_banks(self):
        for layer in self.forward_funcs:
            if isinstance(layer, BlockPipe) and layer.memory is not None:
                layer.__dict__["bank_ref"] = self.tied_modules[f"bank{bank_index(self.cfg, layer.layer_idx)}"]

    def pop_aux_values(self) -> list[dict]:
        """Router losses of this stage's memory blocks since the last call (detached)."""
        values = []
        for layer in self.forward_funcs:
            if isinstance(layer, BlockPipe):
                values += layer.aux_values
                layer.aux_values = []
        return values


def spec_layout(cfg: Config) -> list[str]:
    """The pipeline's layer specs in order, by the name of what each holds: "embed", "banks.j"
    (pass-through in front of a memory block), "layers.i", "norm", "head". Checkpoint layer files
    are numbered by this list."""
    names = ["embed"]
    for i in range(cfg.model.num_layers):
        j = bank_index(cfg, i)
        names += ([] if j is None else [f"banks.{j}"]) + [f"layers.{i}"]
    return names + ["norm", "head"]


def single_process_name(name: str, cfg: Config) -> str:
    """A pipeline stage's parameter name -> the same parameter's name in MoCModel:
    "5.mlp.up_proj.weight" -> "layers.3.mlp.up_proj.weight" (layer specs are numbered by spec_layout),
    "tied_modules.embed.embed_tokens.weight" -> "embed_tokens.weight", "tied_modules.bank0.routed" ->
    "banks.0.routed"."""
    head, rest = name.split(".", 1)
    if head == "tied_modules":
        key, rest = rest.split(".", 1)
        return rest if key == "embed" else f"banks.{key[len('bank'):]}.{rest}"
    return f"{spec_layout(cfg)[int(head)]}.{rest}"


def pipeline_loss(logits, labels):
    labels, loss_mask = labels
    return lm_loss(logits, labels, loss_mask)


def block_costs(cfg: Config) -> dict[str, float]:
    """Forward FLOPs of a plain block, a memory block and the head, from the SPEC 1.6 estimator."""
    report = estimate_flops(cfg, cfg.training.seq_length)
    per = {"block": 0.0, "memory": 0.0, "head": 0.0}
    for term in report.terms:
        kind = term.name.split(".")[0]
        if kind in per:
            per[kind] += term.each
    return {"block": per["block"], "memory_block": per["block"] + per["memory"], "head": per["head"]}
