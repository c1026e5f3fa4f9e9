"""Train or instruction-tune a MoC model: ``python -m moc_megatron.train`` (console script ``moc-train``).

    torchrun --nproc-per-node 2 -m moc_megatron.train --config configs/train/moc-tiny.yaml --mock-data
    deepspeed --num_gpus 8 --module moc_megatron.train --config configs/train/moc-paper-pretrain.yaml ...

Flags are the config's (moc_megatron/config.py, Megatron-style); the run is moc_megatron/training.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def build_parser() -> argparse.ArgumentParser:
    from moc_megatron.config import add_config_args

    parser = argparse.ArgumentParser(prog="moc-train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moc_megatron.config import config_from_args
    from moc_megatron.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        from moc_megatron.training.trainer import train

        train(config_from_args(args))
    except UserError as e:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
