"""The training state without its layout, on torch.distributed.checkpoint (DCP).

    iter_N/model/   every weight under its single-process name (MoCModel's) at its global shape: a
                    tensor-parallel weight is stored as chunks along its partition dimension, a
                    chapter-parallel bank shard as the chunk of routed chapters at its global chapter id
    iter_N/optim/   per weight, AdamW's "optim.<name>.exp_avg", ".exp_avg_sq", ".step" and, when the
                    weights are not fp32, its fp32 ".master"; "bank_optim.<name>.*" the same for
                    RowSparseAdam (--memory-bank-optimizer sparse_adam)

Each directory is one DCP checkpoint (a .metadata file and __<rank>_<i>.distcp files of each writing rank).
Every rank offers what it holds as chunks of the global tensors (``Chunks``); DCP writes each chunk once
(replicas are deduplicated and spread over the ranks holding them) and, on load, reads whichever saved
chunks overlap each rank's own. So TP, PP, EP, DP and the ZeRO stage may all change between save and
load, with no conversion step: the names and global shapes do not depend on them.

ZeRO 1/2 and DeepSpeed's BF16_Optimizer keep AdamW's state in flat fp32 partitions, a range of each
weight's elements per data-parallel rank. Each rank writes its own range, as the few boxes of the
global tensor it makes up, straight from the partition, and reads its range back into it: there is
no collective and no whole copy of the state on any rank (Megatron's fully sharded format does the
same). Under ZeRO 0 the state is per weight: torch's AdamW keyed by the weight in fp32, or
FP16_UnfusedOptimizer's fp32 copy of it in bf16.

Why DCP and not DeepSpeed's universal checkpoint: the universal format needs an offline conversion
(ds_to_universal) and a load flag, and does not reshard MoE expert state (DeepSpeed #6589, #5716);
DCP reshards at load, as torchtitan and Megatron's torch_dist format do.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

from moc_megatron.config import Config
from moc_megatron.errors import UserError

MODEL, OPTIM = "model", "optim"
WRITE_THREADS = 4


# ---------------------------------------------------------------------------------------------
# Names and placements


def global_parameters(module: torch.nn.Module, cfg: Config) -> list[tuple[str, torch.nn.Parameter]]:
    """(single-process name, parameter) of this rank's model or pipeline stage, in a fixed order."""
    if hasattr(module, "tied_modules"):
        from moc_megatron.model.pipeline import single_process_name

        return [(single_process_name(n, cfg), p) for n, p in module.named_parameters()]
    return list(module.named_parameters())


class Chunks:
    """Elements [start, start + n) of this rank's local tensor (row-major, shape ``local``), held in
    ``flat`` ([n]), as DCP chunks of the global tensor (shape ``size``, the local one at ``origin``).

    A range of a row-major tensor is a few boxes (a partial row, whole rows, a partial row; the same
    within a row), each contiguous in ``flat``: they are written from it and read into it in place.
    The whole local tensor (start 0, n its size) is one box."""

    def __init__(self, flat: torch.Tensor, start: int, local: tuple[int, ...], origin: list[int], size: list[int]):
        self.flat, self.global_size, self.boxes = flat, torch.Size(size), {}
        at = 0
        for offsets, sizes in _boxes(start, flat.numel(), tuple(local)):
            offsets = torch.Size(o + g for o, g in zip(offsets, origin))
            self.boxes[offsets] = (torch.Size(sizes), at)
            at += math.prod(sizes)

    def size(self) -> torch.Size:  # the global tensor's, as DCP checks it against the stored one
        return self.global_size

    def box(self, offsets) -> torch.Tensor:
        sizes, at = self.boxes[torch.Size(offsets)]
        return self.flat.narrow(0, at, math.prod(sizes)).view(sizes)

    # DCP's _Checkpointable protocol (as DTensor implements it)
    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        properties = TensorProperties.create_from_tensor(self.flat)
        return [WriteItem(index=MetadataIndex(fqn, offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.global_size))
                for offsets, chunk in zip(self.boxes, self.__create_chunk_list__())]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=offsets, sizes=sizes) for offsets, (sizes, _) in self.boxes.items()]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self.box(index.offset)


def _boxes(start: int, n: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of the boxes that elements [start, start + n) of a row-major tensor of ``shape``
    make up, in order."""
    if n == 0:
        return []
    if len(shape) <= 1:
        return [((start,) * len(shape), (n,) * len(shape))]
    inner, rest = math.prod(shape[1:]), len(shape) - 1
    row, col = divmod(start, inner)
    out = []
    if col:  # the end of a row
        k = min(n, inner - col)
        out += [((row,) + o, (1,) + s) for o, s in _boxes(col, k, shape[1:])]
        row, n = row + 1, n - k
    if n >= inner:  # whole rows
        out.append(((row,) + (0,) * rest, (n // inner,) + shape[1:]))
        row, n = row + n // inner, n % inner
    if n:  # the start of a row
        out += [((row,) + o, (1,) + s) for o, s in _boxes(0, n, shape[1:])]
    return out


class Placement:
    """Where this rank's tensor sits in the global one: a chunk along one dimension over a group, or whole."""

    def __init__(self, ctx):
        self.ctx = ctx

    def of(self, name: str, p: torch.Tensor) -> tuple | None:
        """(group, dim) of the sharded dimension; None when every holder has it whole."""
        ctx = self.ctx
        if ctx.ep_size > 1 and getattr(p, "moc_group", None) == "bank" and name.endswith(".routed"):
            return ctx.ep_group, 0
        if ctx.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
            return ctx.tp_group, p.partition_dim
        return None

    def global_shape(self, name: str, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(self._origin_and_size(name, p)[1])

    def chunks(self, name: str, p: torch.Tensor, flat: torch.Tensor, start: int = 0):
        """``flat``, elements [start, start + n) of p's shape (p's own, or its state's), as DCP should see it."""
        if p.ndim == 0:
            return flat.view(())
        origin, size = self._origin_and_size(name, p)
        return Chunks(flat, start, tuple(p.shape), origin, size)

    def _origin_and_size(self, name: str, p: torch.Tensor) -> tuple[list[int], list[int]]:
        origin, size = [0] * p.ndim, list(p.shape)
        where = self.of(name, p)
        if where is not None:
            group, dim = where
            origin[dim] = dist.get_rank(group) * size[dim]
            size[dim] *= dist.get_world_size(group)
        return origin, size


# ---------------------------------------------------------------------------------------------
# Optimizer state, whichever wrapper holds it


class AdamState:
    """The engine's AdamW state of each weight: ``ranges(p)`` gives, per key (master, exp_avg,
    exp_avg_sq), the elements of it this rank holds, as (flat tensor, start in p's elements);
    ``step_of(p)`` the step.

    Wrappers: ZeRO 1/2 and BF16_Optimizer keep flat fp32 partitions, a range of each weight per
    data-parallel rank (``_hp_mapping``); FP16_UnfusedOptimizer (bf16 under ZeRO 0 on some devices) one
    fp32 copy per weight; ZeRO 0 in fp32 leaves torch's AdamW keyed by the weight itself, its own master."""

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
            self.master_of = {id(lp): hp for lps, hps in zip(self.wrapper.fp16_groups, self.wrapper.fp32_groups)
                              for lp, hp in zip(lps, hps)}
        else:
            self.master_of = {id(p): p for g in inner.param_groups for p in g["params"]}

    def check_covers(self, named, others=()) -> None:
        """Every trained weight has its state here or in ``others``: refuse a wrapper we cannot read."""
        missing = [n for n, p in named if p.requires_grad and not self.manages(p)
                   and not any(o.manages(p) for o in others)]
        if missing:
            raise UserError(f"checkpoint: cannot read the optimizer state of {missing[0]} (and {len(missing) - 1} "
                            f"more) inside DeepSpeed's {type(self.wrapper).__name__}")

    def manages(self, p) -> bool:
        return id(p) in (self.group_of if self.flat else self.master_of)

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

    def step_of(self, p) -> torch.Tensor:
        if self.flat:
            return self.inner.state[self.inner.param_groups[self.group_of[id(p)]]["params"][0]]["step"]
        return self.inner.state[self.master_of[id(p)]]["step"]

    def ranges(self, p) -> dict[str, tuple[torch.Tensor, int]]:
        """key -> (this rank's elements of p's state, flat; the first one's index in p). No "master"
        where the weight is its own (ZeRO 0 in fp32)."""
        if self.flat:
            fragment = p._hp_mapping
            if fragment is None:  # this rank's partition holds none of p
                empty = torch.empty(0, dtype=torch.float32, device=p.device)
                return {k: (empty, 0) for k in ("master", "exp_avg", "exp_avg_sq")}
            start = fragment.lp_fragment_address.start
            return {k: (fragment.get_hp_fragment(None if k == "master" else k), start)
                    for k in ("master", "exp_avg", "exp_avg_sq")}
        hp = self.master_of[id(p)]
        out = {k: (self.inner.state[hp][k].view(-1), 0) for k in ("exp_avg", "exp_avg_sq")}
        if hp is not p:
            out["master"] = (hp.detach().view(-1), 0)
        return out


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

    def step_of(self, p) -> torch.Tensor:
        return self.optimizer.state[p]["step"]

    def ranges(self, p) -> dict[str, tuple[torch.Tensor, int]]:
        return {k: (v.view(-1), 0) for k, v in self.optimizer.state[p].items() if k != "step"}


# ---------------------------------------------------------------------------------------------
# Save and load


def save(engine, cfg: Config, ctx, path: str, pause: Callable[[str], None] = lambda point: None) -> None:
    """Write path/model and path/optim. Collective: every rank calls it."""
    model, optim = state_dicts(engine, cfg, ctx)
    _write(model, os.path.join(path, MODEL))
    pause("model")
    _write(optim, os.path.join(path, OPTIM))


def state_dicts(engine, cfg: Config, ctx) -> tuple[dict, dict]:
    """What this rank offers DCP for path/model and path/optim: its weights, and its ranges of the
    optimizer states (views, no copies). A master is stored only for weights that are not fp32."""
    named, place = global_parameters(engine.module, cfg), Placement(ctx)
    model = {n: place.chunks(n, p, p.detach().view(-1)) for n, p in named}
    optim = {}
    optimizers = _optimizers(engine)
    optimizers[0][1].check_covers(named, [o for _, o in optimizers[1:]])
    for prefix, opt in optimizers:
        opt.ensure()
        for n, p in ((n, p) for n, p in named if opt.manages(p)):
            for k, (flat, start) in opt.ranges(p).items():
                if k != "master" or p.dtype != torch.float32:
                    optim[f"{prefix}.{n}.{k}"] = place.chunks(n, p, flat, start)
            optim[f"{prefix}.{n}.step"] = opt.step_of(p)  # the same on every holder: DCP writes it once
    return model, optim


def load(engine, cfg: Config, ctx, path: str, weights_only: bool = False) -> None:
    """Fill this rank's weights (and, unless weights_only, optimizer states) from path/model, path/optim,
    saved at any layout, in place. A missing or unreadable file, or a name or shape the checkpoint lacks,
    is a UserError that names it.

    An fp32 weight is read from its stored master when there is one (a checkpoint of a bf16 run):
    the master, not its bf16 rounding, is what training continues from."""
    named, place = global_parameters(engine.module, cfg), Placement(ctx)
    optim_folder = os.path.join(path, OPTIM)
    optim_saved = {} if weights_only else stored_tensors(optim_folder)
    optimizers = _optimizers(engine)
    optimizers[0][1].check_covers(named, [o for _, o in optimizers[1:]])
    masters = {n: f"{prefix}.{n}.master" for prefix, opt in optimizers for n, p in named
               if opt.manages(p) and p.dtype == torch.float32 and f"{prefix}.{n}.master" in optim_saved}

    folder = os.path.join(path, MODEL)
    saved = stored_tensors(folder)
    weights = {}
    for n, p in named:
        if n not in masters:
            _check_stored(saved, folder, n, place.global_shape(n, p))
            weights[n] = torch.empty(p.shape, dtype=saved[n][1])
    _read(folder, {n: place.chunks(n, p, weights[n].view(-1)) for n, p in named if n in weights})
    if masters:
        for n, p in named:
            if n in masters:
                _check_stored(optim_saved, optim_folder, masters[n], place.global_shape(n, p))
                weights[n] = torch.empty(p.shape, dtype=torch.float32)
        _read(optim_folder, {masters[n]: place.chunks(n, p, weights[n].view(-1)) for n, p in named if n in masters})
    with torch.no_grad():
        for n, p in named:
            p.copy_(weights[n].to(p.device, p.dtype))

    targets, from_weights = {}, []
    for prefix, opt in optimizers:
        opt.ensure()
        for n, p in ((n, p) for n, p in named if opt.manages(p)):
            for k, (flat, start) in opt.ranges(p).items():
                key = f"{prefix}.{n}.{k}"
                if k == "master" and (weights_only or p.dtype == torch.float32 or key not in optim_saved):
                    from_weights.append((n, flat, start))  # the weight, as loaded above, is the master
                elif not weights_only:
                    _check_stored(optim_saved, optim_folder, key, place.global_shape(n, p))
                    targets[key] = place.chunks(n, p, flat, start)
            if not weights_only:
                key = f"{prefix}.{n}.step"
                _check_stored(optim_saved, optim_folder, key, ())
                targets[key] = opt.step_of(p)
    with torch.no_grad():
        for n, flat, start in from_weights:
            flat.copy_(weights[n].reshape(-1).narrow(0, start, flat.numel()))
    if targets:
        _read(optim_folder, targets)


def _optimizers(engine) -> list[tuple[str, object]]:
    out = [("optim", AdamState(engine))]
    bank = getattr(engine, "moc_bank_optimizer", None)
    if bank is not None:
        out.append(("bank_optim", BankAdamState(bank)))
    return out


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index):
        obj = self.state_dict[index.fqn]
        return obj.box(index.offset) if isinstance(obj, Chunks) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        chunks = {k: v for k, v in state_dict.items() if isinstance(v, Chunks)}
        super().set_up_planner(state_dict, metadata, is_coordinator)  # turns objects it does not know into None
        state_dict.update(chunks)
        self.state_dict.update(chunks)

    def lookup_tensor(self, index):
        obj = self.state_dict[index.fqn]
        return obj.box(index.offset) if isinstance(obj, Chunks) else super().lookup_tensor(index)


def _write(state: dict, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    # four files per rank, written by four threads: 2-3x faster than one on the paper's model here
    # (benchmarks/bench_checkpoint.py), since torch.save into DCP's stream wrapper is slow in a single thread
    writer = FileSystemWriter(folder, single_file_per_rank=True, sync_files=True, thread_count=WRITE_THREADS)
    dcp.save(state, storage_writer=writer, planner=_SavePlanner())


def _read(folder: str, targets: dict) -> None:
    """dcp.load into ``targets`` (this rank's tensors or Chunks of them), in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    try:
        dcp.load(targets, storage_reader=FileSystemReader(folder), planner=_LoadPlanner())
    except Exception as e:  # noqa: BLE001 - DCP raises CheckpointException with every rank's error
        raise UserError(f"{folder}: could not read the checkpoint ({_first_line(e)})") from e


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
