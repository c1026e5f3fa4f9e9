#!/usr/bin/env python
"""Parameters and FLOPs of a config (SPEC 1.6), every term listed so the totals can be audited.

    python tools/estimate_flops.py --config configs/models/moc-paper.yaml [--seq-length L]
                                   [--micro-batch-size B] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import moc_megatron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moc_megatron import accounting
from moc_megatron.config import Config, load_config
from moc_megatron.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Model config YAML (configs/models/*.yaml).")
    parser.add_argument("--seq-length", type=int, help="Tokens per sequence; default the config's.")
    parser.add_argument("--micro-batch-size", type=int,
                        help="Micro-batch of the implemented (unique-chapter) count; default the config's.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    if args.seq_length is not None:
        cfg.training.seq_length = args.seq_length
    if args.micro_batch_size is not None:
        cfg.training.micro_batch_size = args.micro_batch_size
    return cfg.validate()


def summary(cfg: Config) -> dict:
    length, batch = cfg.training.seq_length, cfg.training.micro_batch_size
    spec = accounting.estimate_flops(cfg, length)
    implemented = accounting.implemented_flops(cfg, length, batch)
    worst = accounting.implemented_flops(cfg, length, batch, worst_case=True)
    out = {
        "seq_length": length, "micro_batch_size": batch,
        "params": accounting.count_parameters(cfg),
        "terms": [{"name": t.name, "count": t.count, "each": t.each, "flops": t.flops, "rule": t.rule}
                  for t in spec.terms],
        "forward_flops": spec.forward_flops, "backward_flops": spec.backward_flops,
        "total_flops": spec.total_flops,
        "implemented_forward_flops": implemented.forward_flops,
        "implemented_forward_flops_worst_case": worst.forward_flops,
        "implemented_saving": spec.forward_flops - implemented.forward_flops,
        "matched_vanilla_layers": accounting.matched_vanilla_layers(cfg, length),
    }
    if cfg.has_memory:
        out["unique_chapters_expected"] = accounting.expected_unique_chapters(cfg, batch, length)
        out["unique_chapters_worst_case"] = accounting.worst_case_unique_chapters(cfg, batch, length)
    return out


def print_table(cfg_path: str, s: dict) -> None:
    print(f"{cfg_path}: seq_length {s['seq_length']}, micro_batch_size {s['micro_batch_size']}\n")
    print("Parameters")
    for key, value in s["params"].items():
        print(f"  {key:<15}{value / 1e6:>10.2f}M  {value:>15,}")
    print("\nForward FLOPs per sequence, batch 1 (SPEC 1.6)")
    print(f"  {'term':<28}{'count':>6}{'each':>20}{'total':>20}  rule")
    for t in s["terms"]:
        print(f"  {t['name']:<28}{t['count']:>6}{t['each']:>20,.0f}{t['flops']:>20,.0f}  {t['rule']}")
    print()
    for key in ("forward_flops", "backward_flops", "total_flops"):
        print(f"  {key:<28}{s[key]:>46,.0f}  ({s[key]:.4e})")
    print_implemented(s)


def print_implemented(s: dict) -> None:
    fwd, impl = s["forward_flops"], s["implemented_forward_flops"]
    print(f"\nImplemented forward per sequence at micro-batch {s['micro_batch_size']} "
          "(K/V projected once per micro-batch for the unique chapters)")
    if "unique_chapters_expected" in s:
        print(f"  unique chapters per micro-batch: {s['unique_chapters_expected']:.2f} expected "
              f"(uniform routing), {s['unique_chapters_worst_case']} worst case")
    print(f"  {'implemented_forward_flops':<28}{impl:>46,.0f}  ({impl:.4e})")
    print(f"  {'worst case':<28}{s['implemented_forward_flops_worst_case']:>46,.0f}")
    print(f"  {'saving':<28}{s['implemented_saving']:>46,.0f}  ({100 * s['implemented_saving'] / fwd:.2f}%)")
    print(f"\nVanilla depth with the closest forward FLOPs: {s['matched_vanilla_layers']} layers")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = summary(load(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s))
    else:
        print_table(args.config, s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
