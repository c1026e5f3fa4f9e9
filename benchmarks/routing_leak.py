"""Does the paper's sequence routing gain from seeing the future? (SPEC 1.2, "Causality")

    python benchmarks/routing_leak.py [--out runs/routing_leak] [--seeds 1 2 3] [--iters 300] [--quick]

Trains, on the embedded corpus (built by tools/quickstart.py's first stages if missing), with the same
data and seeds: moc-tiny with sequence routing (the paper), moc-tiny with causal chunk routing, and
the vanilla backbone whose depth the estimator matches to MoC's FLOPs. Each is evaluated on the
validation split twice: with its training-time routing, and causally, where position t uses routing
computed only from tokens up to t (what generation with re-routing sees; computed with one prefix
copy of each sequence per position). Writes a Markdown table and JSON of validation loss, mean and
spread over seeds, and the gap between training-time and causal evaluation.

Runtime on this machine (2 CPU cores): 33.6 min for 3 seeds x 3 models at the defaults, measured
while other work shared the cores (training ~28 min, evaluation 5.2 min; a rerun reuses the trained
checkpoints and only evaluates). --quick runs in about 2 minutes and only checks that everything works.
The result of the full run is in benchmarks/results/routing_leak.md (and .json) and the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import torch  # noqa: E402

MODELS = {
    "moc_sequence": ["--memory-routing-unit", "sequence"],
    "moc_chunk": ["--memory-routing-unit", "chunk", "--memory-routing-chunk", "32"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/routing_leak")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    started, args.reused = time.perf_counter(), []
    if args.quick:
        args.seeds, args.iters, args.eval_sequences = args.seeds[:1], 4, 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, tokenizer = corpus_dataset(out)
    models = dict(MODELS, vanilla=vanilla_flags(args.seq_length))
    results = {name: {"trained": [], "causal": []} for name in models}
    for seed in args.seeds:
        for name, flags in models.items():
            ckpt = train(out, name, seed, flags, data, tokenizer, args)
            trained, causal = evaluate(ckpt, data, tokenizer, args)
            results[name]["trained"].append(trained)
            results[name]["causal"].append(causal)
            print(f"seed {seed} {name}: valid loss {trained:.4f} with training routing, {causal:.4f} causal", flush=True)
    report(out, results, args, runtime_s=time.perf_counter() - started)
    return 0


def corpus_dataset(out: Path):
    import quickstart

    corpus, _ = quickstart.stage_corpus(out, quickstart.SCALE["full"])
    tokenizer = quickstart.stage_tokenizer(out, corpus)
    return quickstart.stage_dataset(out, corpus, tokenizer), tokenizer


def vanilla_flags(seq: int) -> list:
    import quickstart

    return [str(x) for x in quickstart.vanilla_flags({"seq": seq})]


def train(out: Path, name: str, seed: int, flags: list, data: Path, tokenizer: Path, args) -> Path:
    ckpt = out / "checkpoints" / f"{name}-seed{seed}"
    if (ckpt / "latest").exists():
        args.reused.append(ckpt.name)
        return ckpt
    cmd = [sys.executable, "-m", "moc_megatron.train", "--config", "configs/train/moc-tiny.yaml", "--no-mock-data",
           "--data-path", str(data), "--split", "95,5,0", "--tokenizer-type", "SentencePieceTokenizer",
           "--tokenizer-model", str(tokenizer), "--seq-length", str(args.seq_length), "--train-iters", str(args.iters),
           "--lr-warmup-iters", str(min(20, args.iters // 4)), "--eval-interval", "0", "--log-interval",
           str(max(1, args.iters // 10)), "--seed", str(seed), "--save", str(ckpt), *flags]
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # ours, from evaluating
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    subprocess.run(cmd, cwd=ROOT, check=True, env={**env, "PYTHONPATH": str(ROOT)})
    return ckpt


@torch.no_grad()
def evaluate(ckpt: Path, data: Path, tokenizer: Path, args) -> tuple[float, float]:
    from moc_megatron.data import build_pretraining_datasets, build_tokenizer
    from moc_megatron.training.export import merged_state_dict, resolve_tag
    from moc_megatron.training.verify import training_model

    cfg, state = merged_state_dict(resolve_tag(str(ckpt), None))
    model = training_model(cfg, state)
    tok = build_tokenizer("SentencePieceTokenizer", str(tokenizer))
    _, valid, _ = build_pretraining_datasets([str(data)], "95,5,0", args.seq_length, (1, args.eval_sequences, 0),
                                             1234, tok)
    trained, causal = [], []
    for i in range(min(args.eval_sequences, len(valid))):
        item = valid[i]
        tokens, labels = item["tokens"][None], item["labels"][None]
        trained.append(model(tokens, labels).lm_loss.item())
        causal.append(causal_loss(model, tokens, labels))
    return statistics.mean(trained), statistics.mean(causal)


def causal_loss(model, tokens, labels) -> float:
    """Position t routed on tokens <= t only: row t of a batch of prefix copies sees positions <= t
    (causal attention) and its router pools only those (the valid mask)."""
    s = tokens.shape[1]
    rows = tokens.expand(s, s)
    valid = torch.ones(s, s, dtype=torch.bool).tril()  # row t: positions 0..t
    logits = model(rows, valid=valid).logits                              # (s, s, vocab)
    at_t = logits[torch.arange(s), torch.arange(s)]                       # (s, vocab): position t of row t
    return torch.nn.functional.cross_entropy(at_t.float(), labels[0]).item()


def mean_std(vals: list) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def report(out: Path, results: dict, args, runtime_s: float | None = None) -> None:
    """Per model: validation loss with training-time and with causal routing (mean ± std over seeds),
    the gap between the two (per seed, then mean ± std), and the causal loss minus vanilla's paired
    by seed (same data order and evaluation sequences)."""
    rows, base = [], results.get("vanilla", {}).get("causal")
    for name, r in results.items():
        row = {"model": name, "seeds": args.seeds}
        for mode in ("trained", "causal"):
            row[f"{mode}_mean"], row[f"{mode}_std"] = mean_std(r[mode])
        row["gap_mean"], row["gap_std"] = mean_std([c - t for t, c in zip(r["trained"], r["causal"])])
        if base and name != "vanilla":
            row["causal_vs_vanilla_mean"], row["causal_vs_vanilla_std"] = mean_std([c - v for c, v in zip(r["causal"], base)])
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "runtime_s": runtime_s}
    (out / "routing_leak.json").write_text(json.dumps({"settings": settings, "rows": rows, "raw": results}, indent=1))
    lines = ["| model | valid loss, training-time routing | valid loss, causal routing | causal - training-time "
             "| causal - vanilla (paired) |", "|---|---|---|---|---|"]
    for r in rows:
        vs = (f"{r['causal_vs_vanilla_mean']:+.4f} ± {r['causal_vs_vanilla_std']:.4f}"
              if "causal_vs_vanilla_mean" in r else "–")
        lines.append(f"| {r['model']} | {r['trained_mean']:.4f} ± {r['trained_std']:.4f} | "
                     f"{r['causal_mean']:.4f} ± {r['causal_std']:.4f} | {r['gap_mean']:+.4f} ± {r['gap_std']:.4f} | {vs} |")
    table = "\n".join(lines)
    note = (f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.iters} iterations each, "
            f"{args.eval_sequences} validation sequences of {args.seq_length} tokens; mean ± sample std over seeds."
            + (f" Runtime {runtime_s / 60:.1f} min" if runtime_s else "")
            + (f" (evaluation only: {len(args.reused)} trained checkpoints reused)." if args.reused else "."))
    (out / "routing_leak.md").write_text(table + "\n" + note + "\n")
    print(table + "\n" + note)


if __name__ == "__main__":
    sys.exit(main())
