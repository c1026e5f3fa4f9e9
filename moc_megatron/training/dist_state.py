"""The training state without its layout, on torch.distributed.checkpoint (DCP).

    iter_N/model/   every weight under its single-process name (MoCModel's) at its global shape: a
                    tensor-parallel weight is stored as chunks along its partition dimension, a
                    chapter-parallel bank shard as the chunk of routed chapters at its global chapter id
    iter_N/optim/   per weight, AdamW's "optim.<name>.exp_avg", ".exp_avg_sq", ".step" and, when the
                    weights are not fp32, its fp32 ".master"; "bank_optim.<name>.*" the same for
                    RowSparseAdam (--memory-bank-optimizer sparse_adam)

Each directory is one DCP checkpoint (a .metadata file and __<rank>_<i>.distcp files of each writing rank).
Every rank offers what it holds; DCP writes each chunk once (replicas are deduplicated and spread
over the ranks holding them) and, on load, reads whichever saved chunks overlap each rank's slice of
the new layout. So TP, PP, EP, DP and the ZeRO stage may all change between save and load, with no
conversion step: the names and global shapes do not depend on them.

ZeRO 1/2 and DeepSpeed's BF16_Optimizer keep AdamW's state in flat fp32 partitions; each weight's
fragments are summed into the whole (TP-local) tensor on one of its data-parallel ranks (a reduce;
the ranks take turns, so each keeps about 1/DP of the state in host memory) and scattered back at
load with DeepSpeed's safe_set_full_*, which copy only this rank's fragment. Under ZeRO 0 in fp32, torch's AdamW holds the state keyed by the weight itself.

Why DCP and not DeepSpeed's universal checkpoint: the universal format needs an offline conversion
(ds_to_universal) and a load flag, and does not reshard MoE expert state (DeepSpeed #6589, #5716);
DCP reshards at load, as torchtitan and Megatron's torch_dist format do.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from moc_megatron.config import Config
from moc_megatron.errors import UserError

MODEL, OPTIM = "model", "optim"
ADAM_KEYS = ("master", "exp_avg", "exp_avg_sq", "step")
WRITE_THREADS = 4


# ---------------------------------------------------------------------------------------------
# Names and placements


def global_parameters(module: torch.nn.Module, cfg: Config) -> list[tuple[str, torch.nn.Parameter]]:
    """(single-process name, parameter) of this rank's model or pipeline stage, in a fixed order."""
    if hasattr(module, "tied_modules"):
        from moc_megatron.model.pipeline import single_process_name

        return [(single_process_name(n, cfg), p) for n, p in module.named_parameters()]
    return list(module.named_parameters())


class Placement:
    """Where this rank's tensor sits in the global one: a chunk along ``dim`` over ``group``, or whole."""

    def __init__(self, ctx):
        self.ctx, self.meshes = ctx, {}

    def of(self, name: str, p: torch.Tensor) -> tuple | None:
        """(group, dim) of the sharded dimension; None when every holder has it whole."""
        ctx = self.ctx
        if ctx.ep_size > 1 and getattr(p, "moc_group", None) == "bank" and name.endswith(".routed"):
            return ctx.ep_group, 0
        if ctx.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            return ctx.tp_group, p.partition_dim
        return None

    def wrap(self, where: tuple | None, local: torch.Tensor):
        """``local`` as DCP should see it: a DTensor chunk of the global tensor, or the tensor itself."""
        if where is None or local.ndim == 0:
            return local
        from torch.distributed.tensor import DTensor, Shard

        group, dim = where
        if id(group) not in self.meshes:
            from torch.distributed.device_mesh import DeviceMesh

            self.meshes[id(group)] = DeviceMesh.from_group(group, "cpu")
        return DTensor.from_local(local, self.meshes[id(group)], [Shard(dim)], run_check=False)


# ---------------------------------------------------------------------------------------------
# Optimizer state, whichever wrapper holds it


class AdamState:
    """The engine's AdamW state of each weight as whole TP-local tensors: master (fp32), exp_avg,
    exp_avg_sq, step. ``get`` is collective over the weight's data-parallel group under ZeRO.

    Wrappers: ZeRO 1/2 and BF16_Optimizer keep flat fp32 partitions linked to each weight
    (``_hp_mapping``); FP16_UnfusedOptimizer (bf16 under ZeRO 0 on some devices) one fp32 copy per
    weight; ZeRO 0 in fp32 leaves torch's AdamW keyed by the weight itself."""

    def __init__(self, engine):
        self.wrapper = inner = engine.optimizer
        while hasattr(inner, "optimizer") and inner.optimizer is not inner:
            inner = inner.optimizer
        self.inner = inner  # torch's AdamW
        lp_groups = getattr(self.wrapper, "bit16_groups", None) or getattr(self.wrapper, "bf16_groups", None)
        self.flat = lp_groups is not None
        if self.flat:
            self.group_of = {id(p): i for i, group in enumerate(lp_groups) for p in group}
            self.master_of = {}
        elif hasattr(self.wrapper, "fp16_groups") and hasattr(self.wrapper, "fp32_groups"):
            pairs = [(lp, hp) for lps, hps in zip(self.wrapper.fp16_groups, self.wrapper.fp32_groups)
                     for lp, hp in zip(lps, hps)]
            self.master_of = {id(lp): hp for lp, hp in pairs}
            self.group_of = {id(lp): 0 for lp, _ in pairs}
        else:
            self.master_of = {id(p): p for g in inner.param_groups for p in g["params"]}
            self.group_of = {id(p): 0 for g in inner.param_groups for p in g["params"]}

    def check_covers(self, named, others=()) -> None:
        """Every trained weight has its state here or in ``others``: refuse a wrapper we cannot read."""
        missing = [n for n, p in named if p.requires_grad and not self.manages(p)
                   and not any(o.manages(p) for o in others)]
        if missing:
            raise UserError(f"checkpoint: cannot read the optimizer state of {missing[0]} (and {len(missing) - 1} "
                            f"more) inside DeepSpeed's {type(self.wrapper).__name__}")

    def manages(self, p) -> bool:
        return id(p) in self.group_of

    def ensure(self) -> None:
        """Create AdamW's state where there is none yet (before the first step), and link each weight's
        fragment to it (DeepSpeed links lazily, and not on every path)."""
        for g in self.inner.param_groups:
            for hp in g["params"]:
                if not self.inner.state.get(hp):
                    device = hp.device if g.get("fused") or g.get("capturable") else torch.device("cpu")
                    self.inner.state[hp] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                            "exp_avg": torch.zeros_like(hp, memory_format=torch.preserve_format),
                                            "exp_avg_sq": torch.zeros_like(hp, memory_format=torch.preserve_format)}
        if self.flat:
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()

    def _step_of(self, p) -> torch.Tensor:
        if self.flat:
            return self.inner.state[self.inner.param_groups[self.group_of[id(p)]]["params"][0]]["step"]
        return self.inner.state[self.master_of[id(p)]]["step"]

    def get(self, p, keeper: int) -> dict[str, torch.Tensor] | None:
        """On global rank ``keeper`` (one of the ranks holding p), p's state; None on the others. Collective
        over p's data-parallel group when ZeRO partitions it. Of a weight in fp32, no master: the weight is."""
        keys = ("exp_avg", "exp_avg_sq") + (("master",) if p.dtype != torch.float32 else ())
        if self.flat:
            out = {k: self._full(p, None if k == "master" else k, keeper) for k in keys}
        else:
            hp = self.master_of[id(p)]
            out = {k: hp.detach() if k == "master" else self.inner.state[hp][k] for k in keys}
        if dist.get_rank() != keeper:
            return None
        out["step"] = self._step_of(p)
        return {k: v.detach().to("cpu", torch.float32) for k, v in out.items()}

    @staticmethod
    def _full(p, key: str | None, keeper: int) -> torch.Tensor | None:
        """The whole (TP-local) fp32 master (key None) or moment of p, on ``keeper``: each rank's fragment
        summed into it (a reduce, not DeepSpeed's all-reduce: only one rank writes it). Without
        data-parallel partitioning this rank holds it whole: a view, no collective (the same choice on
        every rank)."""
        fragment = p._hp_mapping
        if dist.get_world_size(p._dp_group) == 1 and fragment is not None \
                and fragment.lp_fragment_address.numel == p.numel():
            return fragment.get_hp_fragment(key).view(p.shape)
        buffer = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        if fragment is not None:
            address = fragment.lp_fragment_address
            buffer.narrow(0, address.start, address.numel).copy_(fragment.get_hp_fragment(key))
        dist.reduce(buffer, dst=keeper, group=p._dp_group)
        return buffer.view(p.shape)

    def set(self, p, state: dict[str, torch.Tensor]) -> None:
        """``state``: master (fp32), exp_avg, exp_avg_sq (TP-local shape), step (0-d)."""
        if self.flat:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(p, state["master"].to(p.device))
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, state[k].to(p.device), k)
        else:
            hp = self.master_of[id(p)]
            hp.data.copy_(state["master"])
            for k in ("exp_avg", "exp_avg_sq"):
                self.inner.state[hp][k].copy_(state[k])
        self._step_of(p).copy_(state["step"])

    def set_master(self, p, weight: torch.Tensor) -> None:
        """The fp32 master of ``p`` from a weight (--finetune: weights without optimizer state)."""
        if self.flat:
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, weight.to(p.device, torch.float32))
        else:
            self.master_of[id(p)].data.copy_(weight)


class BankAdamState:
    """RowSparseAdam's state (--memory-bank-optimizer sparse_adam): per bank weight, not partitioned."""

    def __init__(self, bank_optimizer):
        self.optimizer = bank_optimizer.optimizer
        self.params = {id(p) for p, _ in bank_optimizer.params}

    def manages(self, p) -> bool:
        return id(p) in self.params

    def ensure(self) -> None:
        for p in (p for g in self.optimizer.param_groups for p in g["params"]):
            if not self.optimizer.state.get(p):
                state = {"step": torch.tensor(0.0),
                         "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                         "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
                if p.dtype != torch.float32:
                    state["master"] = p.detach().float()
                self.optimizer.state[p] = state

    def get(self, p, keeper: int) -> dict[str, torch.Tensor] | None:
        if dist.get_rank() != keeper:
            return None
        return {k: v.detach().cpu() for k, v in self.optimizer.state[p].items()}

    def set(self, p, state: dict[str, torch.Tensor]) -> None:
        for k, v in self.optimizer.state[p].items():  # "master" only in bf16; load() fills it from the weight
            v.copy_(state[k])


# ---------------------------------------------------------------------------------------------
# Save and load


def save(engine, cfg: Config, ctx, path: str, pause: Callable[[str], None] = lambda point: None) -> None:
    """Write path/model and path/optim. Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    named, place = global_parameters(engine.module, cfg), Placement(ctx)
    weights = {n: place.wrap(place.of(n, p), p.detach().cpu()) for n, p in named}
    dcp.save(weights, storage_writer=_writer(os.path.join(path, MODEL)))
    pause("model")
    state = {}
    optimizers = _optimizers(engine)
    optimizers[0][1].check_covers(named, [o for _, o in optimizers[1:]])
    for prefix, opt in optimizers:
        opt.ensure()
        for i, (n, p) in enumerate((n, p) for n, p in named if opt.manages(p)):
            # the replicas take turns keeping (and writing) a weight's state: host memory and writes spread
            entry = opt.get(p, _keeper(p, ctx, i))
            for k, v in (entry or {}).items():
                state[f"{prefix}.{n}.{k}"] = place.wrap(place.of(n, p), v)
    dcp.save(state, storage_writer=_writer(os.path.join(path, OPTIM)))


def load(engine, cfg: Config, ctx, path: str, weights_only: bool = False) -> None:
    """Fill this rank's weights (and, unless weights_only, optimizer states) from path/model, path/optim,
    saved at any layout. A missing or unreadable file, or a name or shape the checkpoint lacks, is a
    UserError that names it."""
    named, place = global_parameters(engine.module, cfg), Placement(ctx)
    folder = os.path.join(path, MODEL)
    saved = stored_tensors(folder)
    weights = {}
    for n, p in named:
        _check_stored(saved, folder, n, _global_shape(place.of(n, p), p))
        weights[n] = torch.empty(p.shape, dtype=saved[n][1])
    _read(folder, weights, place, named)
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n].to(p.device, p.dtype))
    if weights_only:
        adam = AdamState(engine)
        for n, p in named:
            if adam.manages(p):
                adam.set_master(p, weights[n])
        return
    folder = os.path.join(path, OPTIM)
    saved = stored_tensors(folder)
    optimizers = _optimizers(engine)
    optimizers[0][1].check_covers(named, [o for _, o in optimizers[1:]])
    for prefix, opt in optimizers:
        opt.ensure()
        mine = [(n, p) for n, p in named if opt.manages(p)]
        state = {}
        for n, p in mine:
            for k in ADAM_KEYS:
                key = f"{prefix}.{n}.{k}"
                if k == "master" and key not in saved:
                    continue  # saved in fp32: the master is the weight
                _check_stored(saved, folder, key, () if k == "step" else _global_shape(place.of(n, p), p))
                state[key] = torch.empty(() if k == "step" else p.shape, dtype=torch.float32)
        _read(folder, state, place, mine, prefix)
        for n, p in mine:
            entry = {k: state[f"{prefix}.{n}.{k}"] for k in ADAM_KEYS if f"{prefix}.{n}.{k}" in state}
            entry.setdefault("master", weights[n].float())
            opt.set(p, entry)


def _optimizers(engine) -> list[tuple[str, object]]:
    out = [("optim", AdamState(engine))]
    bank = getattr(engine, "moc_bank_optimizer", None)
    if bank is not None:
        out.append(("bank_optim", BankAdamState(bank)))
    return out


def _keeper(p, ctx, i: int) -> int:
    """The global rank that keeps the i-th weight's optimizer state for writing: the (i mod n)-th of the
    n ranks holding the same TP-local weight (its data-parallel group; the expert-data-parallel group
    for a chapter-parallel bank shard)."""
    group = getattr(p, "_dp_group", None)
    if group is None:
        routed = ctx.ep_size > 1 and getattr(p, "allreduce", True) is False
        group = ctx.expert_dp_group if routed else ctx.dp_group
    if group is None or dist.get_world_size(group) == 1:
        return dist.get_rank()
    return dist.get_global_rank(group, i % dist.get_world_size(group))


def _global_shape(where: tuple | None, p: torch.Tensor) -> tuple[int, ...]:
    shape = list(p.shape)
    if where is not None:
        group, dim = where
        shape[dim] *= dist.get_world_size(group)
    return tuple(shape)


def _writer(folder: str):
    from torch.distributed.checkpoint import FileSystemWriter

    # four files per rank, written by four threads: 2-3x faster than one on the paper's model here
    # (benchmarks/bench_checkpoint.py), since torch.save into DCP's stream wrapper is slow in a single thread
    return FileSystemWriter(folder, single_file_per_rank=True, sync_files=True, thread_count=WRITE_THREADS)


def _read(folder: str, targets: dict[str, torch.Tensor], place: Placement, named, prefix: str | None = None) -> None:
    """dcp.load into ``targets`` (this rank's local tensors), each wrapped by its parameter's placement."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    where = {n: place.of(n, p) for n, p in named}
    wrapped = {k: place.wrap(where[_param_name(k, prefix)], t) for k, t in targets.items()}
    try:
        dcp.load(wrapped, storage_reader=FileSystemReader(folder))
    except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException with every rank's error
        raise UserError(f"{folder}: could not read the checkpoint ({_first_line(e)})") from e


def _param_name(key: str, prefix: str | None) -> str:
    if prefix is None:
        return key
    return key[len(prefix) + 1 : key.rindex(".")]


def stored_tensors(folder: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (global shape, dtype) of the DCP checkpoint in ``folder``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = os.path.join(folder, ".metadata")
    if not os.path.isfile(metadata):
        raise UserError(f"{metadata} is missing: the checkpoint is incomplete")
    try:
        meta = FileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails inside pickle
        raise UserError(f"{metadata}: unreadable ({_first_line(e)}); the checkpoint is corrupted") from e
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _check_stored(saved: dict, folder: str, key: str, shape: tuple[int, ...]) -> None:
    if key not in saved:
        raise UserError(f"{folder}/.metadata: the checkpoint has no '{key}'")
    if tuple(saved[key][0]) != tuple(shape):
        raise UserError(f"{folder}/.metadata: '{key}' is {list(saved[key][0])} there and {list(shape)} here")


def read_full(folder: str, keys=None) -> dict[str, torch.Tensor]:
    """Whole tensors of a DCP checkpoint, in one process with no torch.distributed (the HF export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    saved = stored_tensors(folder)
    out = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in saved.items() if keys is None or k in keys}
    try:
        dcp.load(out, storage_reader=FileSystemReader(folder), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{folder}: could not read the checkpoint ({_first_line(e)})") from e
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
