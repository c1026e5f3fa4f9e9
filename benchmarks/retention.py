"""Do memory models keep more of their pretraining through instruction tuning? (issue #16)

    python benchmarks/retention.py [--out runs/retention] [--seeds 1 2 3] [--iters 600] [--ift-iters 200] [--quick]

The paper's retention claim in miniature. Per seed, on the embedded corpus (tools/quickstart.py's first
stages, no download):
  1. pretrain moc-tiny with causal chunk routing (chunks of 32) and the vanilla backbone whose depth the
     estimator matches to MoC's forward FLOPs (quickstart.vanilla_flags: 11 layers at 128 tokens);
  2. instruction-tune on the derived chat set (quickstart's chat data, split 95/5 by conversation once,
     the same for every seed): MoC with the bank frozen (--freeze-memory-bank), MoC with the bank
     trained (bank LR 5e-5, the paper's bank : backbone ratio of 1 : 6), and vanilla; quickstart's IFT
     learning rates (quickstart.IFT_LRS);
  3. score every checkpoint: lm loss on the pretraining validation split (before and after IFT; the
     whole split, one epoch, the same sequences for every model), lm loss on the held-out chat
     conversations (assistant tokens only), and lm-eval's accuracy on the local task
     tools/eval_tasks/moc_pydoc_mc through moc-eval (quickstart.stage_evaluate).
All training goes through the real CLI (`python -m moc_megatron.train`), one process per run; the
losses are computed here on the merged checkpoint (moc_megatron.training.export / verify), as
benchmarks/routing_leak.py does, because the trainer has no evaluate-only mode.

Reported over seeds (mean ± sample std) and as differences paired by seed (the same data order, the
same validation sequences): MoC-frozen − vanilla, MoC-trained − vanilla, frozen − trained.
Writes benchmarks/results/retention.{md,json,png} (--results elsewhere; --quick writes under --out).
Finished trainings and lm-eval results under --out are reused when rerun.

Runtime on this machine: 40.4 min for the defaults on ONE core (`taskset -c 1`, OMP_NUM_THREADS=1, while
other work ran on the second core): training 36.5 min (15 runs, 5,400 steps), evaluation 3.8 min; sized
to stay under 45 minutes on 2 cores. --quick (1 seed, a few steps, 8 questions) only checks that
everything works, in 2-4 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import quickstart  # noqa: E402

ARMS = ("moc_frozen", "moc_trained", "vanilla")                    # the instruction-tuned models
BASE = {"moc_frozen": "moc", "moc_trained": "moc", "vanilla": "vanilla"}   # ... and what each starts from
IFT_FLAGS = {"moc_frozen": ["--freeze-memory-bank"], "moc_trained": ["--memory-bank-lr", "5e-5"], "vanilla": []}
PAIRS = (("moc_frozen", "vanilla"), ("moc_trained", "vanilla"), ("moc_frozen", "moc_trained"))
LABELS = {"moc_frozen": "MoC, bank frozen", "moc_trained": "MoC, bank trained", "vanilla": "vanilla, FLOPs-matched"}
# (key, column header, number format)
METRICS = (("pretrain_before", "pretrain-valid loss, before IFT", ".4f"),
           ("pretrain_after", "pretrain-valid loss, after IFT", ".4f"),
           ("forgetting", "forgetting (after − before)", "+.4f"),
           ("ift_valid", "IFT-valid loss", ".4f"),
           ("acc_before", "local-task acc, before", ".3f"),
           ("acc_after", "local-task acc, after", ".3f"))
# in the JSON only; drift: |after - before| / |before| of the bank's and of all other weights
EXTRA = ("ift_valid_before", "acc_change", "acc_norm_before", "acc_norm_after", "bank_drift", "backbone_drift")
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
CHAT_VALID_FRACTION, CHAT_SPLIT_SEED, EVAL_SEED = 0.05, 0, 1234


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/retention", help="corpus, checkpoints, logs, lm-eval results")
    p.add_argument("--results", help="where retention.{md,json,png} go (default: benchmarks/results; "
                                     "with --quick: <--out>/results, so a check never overwrites the measured run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--iters", type=int, default=600, help="pretraining steps (1,024 tokens each)")
    p.add_argument("--ift-iters", type=int, default=200, help="instruction-tuning steps")
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=0, help="pretraining-valid sequences scored (0: all)")
    p.add_argument("--eval-limit", type=int, default=0, help="local-task questions (0: all 40)")
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps: checks that everything runs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.iters, args.ift_iters = args.seeds[:1], 8, 4  # pairing: tests/test_retention.py
        args.eval_sequences, args.eval_limit = 16, 8
    if args.results is None:
        args.results = str(Path(args.out).resolve() / "results" if args.quick else ROOT / "benchmarks" / "results")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started, args.reused = time.perf_counter(), []
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for k in DIST_VARS:  # a stray launcher variable must not reach the runs (or lm-eval's accelerate)
        os.environ.pop(k, None)
    corpus, chat = quickstart.stage_corpus(out, quickstart.SCALE["quick" if args.quick else "full"])
    tokenizer = quickstart.stage_tokenizer(out, corpus)
    data = quickstart.stage_dataset(out, corpus, tokenizer)
    chat_train, chat_valid = split_chat(chat, out / "chat")
    args.tokenizer = tokenizer
    model_flags = {"moc": [str(x) for x in quickstart.CHUNK_ROUTING],
                   "vanilla": [str(x) for x in quickstart.vanilla_flags({"seq": args.seq_length})]}

    print(f"\n=== training: {len(args.seeds)} seeds x (2 pretrainings of {args.iters} steps + "
          f"3 instruction tunings of {args.ift_iters} steps)", flush=True)
    ckpts = {}  # run name -> checkpoint: {moc,vanilla}-seed<s> (pretrained), <arm>-ift-seed<s> (instruction-tuned)
    for seed in args.seeds:
        for base in ("moc", "vanilla"):
            name = run_name(base, seed)
            ckpts[name] = train(out, name, pretrain_cmd(data, seed, args) + model_flags[base], args)
        for arm in ARMS:
            name = run_name(arm, seed, ift=True)
            ckpts[name] = train(out, name, ift_cmd(ckpts[run_name(BASE[arm], seed)], chat_train, seed, args)
                                + model_flags[BASE[arm]] + IFT_FLAGS[arm], args)
    trained_s = time.perf_counter() - started

    print("\n=== evaluation: lm-eval on the local task (moc-eval), then the two validation losses", flush=True)
    scores = quickstart.stage_evaluate(out, ckpts, tokenizer, {"eval_limit": args.eval_limit or None})
    sets = validation_sets(data, chat_valid, tokenizer, args)
    losses = {key: validation_losses(ckpt, sets) for key, ckpt in ckpts.items()}
    drift = {run_name(arm, seed, ift=True): weight_drift(ckpts[run_name(BASE[arm], seed)],
                                                         ckpts[run_name(arm, seed, ift=True)])
             for arm in ARMS for seed in args.seeds}
    args.eval_counts = {name: len(items) for name, items in sets.items()}
    raw = collect(args.seeds, scores, losses, drift)
    runtime_s = time.perf_counter() - started
    report(Path(args.results), raw, args, {"runtime_s": runtime_s, "training_s": trained_s,
                                          "evaluation_s": runtime_s - trained_s})
    return 0


def run_name(model: str, seed: int, ift: bool = False) -> str:
    return f"{model}{'-ift' if ift else ''}-seed{seed}"


# --- data ------------------------------------------------------------------------------------------


def split_chat(chat: Path, where: Path) -> tuple[Path, Path]:
    """The chat set cut once, by conversation, into train and held-out files (the same for every seed
    and model, so the IFT-valid loss of every run is on the same conversations)."""
    import numpy as np

    train, valid = where / "train.jsonl", where / "valid.jsonl"
    if not valid.exists():
        where.mkdir(parents=True, exist_ok=True)
        lines = [line for line in chat.read_text().splitlines() if line.strip()]
        order = np.random.RandomState(CHAT_SPLIT_SEED).permutation(len(lines))
        n_valid = max(1, round(CHAT_VALID_FRACTION * len(lines)))
        train.write_text("".join(lines[i] + "\n" for i in sorted(order[n_valid:])))
        valid.write_text("".join(lines[i] + "\n" for i in sorted(order[:n_valid])))
    return train, valid


# --- training --------------------------------------------------------------------------------------


def common_cmd(seed: int, iters: int, args) -> list:
    return [sys.executable, "-m", "moc_megatron.train", "--config", "configs/train/moc-tiny.yaml", "--no-mock-data",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(args.tokenizer),
            "--seq-length", str(args.seq_length), "--train-iters", str(iters),
            "--lr-warmup-iters", str(min(20, iters // 4)), "--log-interval", str(max(1, iters // 10)),
            "--eval-interval", "0", "--seed", str(seed)]


def pretrain_cmd(data: Path, seed: int, args) -> list:
    """moc-tiny's pretraining recipe (configs/train/moc-tiny.yaml) on the corpus's 95% training split."""
    return common_cmd(seed, args.iters, args) + ["--data-path", str(data), "--split", "95,5,0"]


def ift_cmd(pretrained: Path, chat_train: Path, seed: int, args) -> list:
    """From the pretrained weights (--finetune: new optimizer and schedule), the quickstart's IFT LRs."""
    return common_cmd(seed, args.ift_iters, args) + [
        "--load", str(pretrained), "--finetune", "--chat-data", str(chat_train), "--split", "100,0,0",
        *map(str, quickstart.IFT_LRS)]


def train(out: Path, name: str, cmd: list, args) -> Path:
    ckpt, log = out / "checkpoints" / name, out / "logs" / f"{name}.log"
    if (ckpt / "latest").exists():
        args.reused.append(name)
        print(f"  {name}: reusing {ckpt.relative_to(out)}", flush=True)
        return ckpt
    log.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out / "logs" / f"{name}.jsonl"
    jsonl.unlink(missing_ok=True)  # the trainer appends
    cmd = cmd + ["--save", str(ckpt), "--log-jsonl", str(jsonl)]
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"retention: {name} failed (exit {rc}); {log}:\n{tail}")
    last = [json.loads(line) for line in jsonl.read_text().splitlines()][-1:] if jsonl.exists() else []
    lm = f", last logged lm loss {last[0]['lm_loss']:.4f}" if last and last[0].get("lm_loss") is not None else ""
    print(f"  {name}: {time.perf_counter() - started:.0f} s{lm}", flush=True)
    return ckpt


# --- evaluation ------------------------------------------------------------------------------------


def validation_sets(data: Path, chat_valid: Path, tokenizer: Path, args) -> dict:
    """{name: dataset}: the pretraining validation split (one epoch, shuffled with a fixed seed) and the
    held-out chat conversations packed as in training (loss on assistant tokens)."""
    from moc_megatron.data import build_chat_datasets, build_pretraining_datasets, build_tokenizer

    tok = build_tokenizer("SentencePieceTokenizer", str(tokenizer))
    _, valid, _ = build_pretraining_datasets([str(data)], "95,5,0", args.seq_length, (1, 1, 0), EVAL_SEED, tok)
    chat, _, _ = build_chat_datasets([str(chat_valid)], "1,0,0", args.seq_length, EVAL_SEED, tok)
    n = min(len(valid), args.eval_sequences or len(valid))
    args.pretrain_valid_total = len(valid)
    return {"pretrain": [valid[i] for i in range(n)], "ift": [chat[i] for i in range(len(chat))]}


def validation_losses(ckpt: Path, sets: dict, batch: int = 16) -> dict:
    """Token-weighted mean lm loss of the merged checkpoint (single process, fp32) on each set."""
    import torch

    from moc_megatron.training.export import merged_state_dict, resolve_tag
    from moc_megatron.training.verify import training_model

    cfg, state = merged_state_dict(resolve_tag(str(ckpt), None))
    model = training_model(cfg, state)
    losses = {}
    with torch.no_grad():
        for name, items in sets.items():
            total = count = 0.0
            for i in range(0, len(items), batch):
                chunk = items[i:i + batch]
                tokens, labels, mask = (torch.stack([torch.as_tensor(it[k]) for it in chunk])
                                        for k in ("tokens", "labels", "loss_mask"))
                n = mask.float().sum().item()
                if n:
                    total += model(tokens.long(), labels.long(), mask.float()).lm_loss.item() * n
                    count += n
            losses[name] = total / count
    return losses


def weight_drift(before: Path, after: Path) -> dict:
    """How far instruction tuning moved the weights: ||after - before|| / ||before|| over the bank
    (0 when frozen) and over everything else."""
    import torch

    from moc_megatron.training.export import merged_state_dict, resolve_tag

    a, b = (merged_state_dict(resolve_tag(str(c), None))[1] for c in (before, after))
    sums = {"bank": [0.0, 0.0], "backbone": [0.0, 0.0]}
    for key, w in a.items():
        if key not in b or not torch.is_floating_point(w):
            continue
        part = sums["bank" if key.startswith("banks.") else "backbone"]
        part[0] += (b[key].double() - w.double()).pow(2).sum().item()
        part[1] += w.double().pow(2).sum().item()
    return {k: math.sqrt(d / n) if n else 0.0 for k, (d, n) in sums.items()}


def collect(seeds: list, scores: dict, losses: dict, drift: dict) -> dict:
    """{arm: {metric: [value per seed]}}; "before" is the arm's pretrained checkpoint."""
    raw = {arm: {m: [] for m, _, _ in METRICS} | {m: [] for m in EXTRA} for arm in ARMS}
    for arm in ARMS:
        r = raw[arm]
        for seed in seeds:
            before, after = run_name(BASE[arm], seed), run_name(arm, seed, ift=True)
            r["pretrain_before"].append(losses[before]["pretrain"])
            r["pretrain_after"].append(losses[after]["pretrain"])
            r["forgetting"].append(losses[after]["pretrain"] - losses[before]["pretrain"])
            r["ift_valid_before"].append(losses[before]["ift"])
            r["ift_valid"].append(losses[after]["ift"])
            r["acc_before"].append(scores[before]["acc"])
            r["acc_after"].append(scores[after]["acc"])
            r["acc_change"].append(scores[after]["acc"] - scores[before]["acc"])
            r["acc_norm_before"].append(scores[before].get("acc_norm", float("nan")))
            r["acc_norm_after"].append(scores[after].get("acc_norm", float("nan")))
            r["bank_drift"].append(drift[after]["bank"])
            r["backbone_drift"].append(drift[after]["backbone"])
    return raw


# --- report ----------------------------------------------------------------------------------------


def mean_std(vals: list) -> dict:
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def paired(raw: dict) -> dict:
    """{"a-b": {metric: {per_seed: [a_i - b_i], mean, std}}} for each pair of arms, per seed."""
    result = {}
    for a, b in PAIRS:
        result[f"{a}-{b}"] = {}
        for m in [m for m, _, _ in METRICS] + list(EXTRA):
            diffs = [x - y for x, y in zip(raw[a][m], raw[b][m])]
            result[f"{a}-{b}"][m] = {"per_seed": diffs, **mean_std(diffs)}
    return result


def summarise(raw: dict) -> dict:
    return {arm: {m: mean_std(vals) for m, vals in r.items()} for arm, r in raw.items()}


def tables(summary: dict, pairs: dict) -> str:
    head = "| | " + " | ".join(h for _, h, _ in METRICS) + " |\n|---|" + "---|" * len(METRICS)
    rows = [head]
    for arm in ARMS:
        cells = [f"{num(summary[arm][m]['mean'], f)} ± {num(summary[arm][m]['std'], f.lstrip('+'))}"
                 for m, _, f in METRICS]
        rows.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    rows += ["", "Paired by seed (per-seed difference, then mean ± std):", "",
             head.replace("| |", "| difference |", 1)]
    for a, b in PAIRS:
        p = pairs[f"{a}-{b}"]
        cells = [f"{num(p[m]['mean'], '+' + f.lstrip('+'))} ± {num(p[m]['std'], f.lstrip('+'))}"
                 for m, _, f in METRICS]
        rows.append(f"| {short(a)} − {short(b)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def short(arm: str) -> str:
    return {"moc_frozen": "MoC-frozen", "moc_trained": "MoC-trained", "vanilla": "vanilla"}[arm]


def sign_count(diffs: list) -> str:
    neg, pos = sum(d < 0 for d in diffs), sum(d > 0 for d in diffs)
    if not neg and not pos:
        return "0 in every seed"
    return f"{neg} of {len(diffs)} seeds below zero" if neg >= pos else f"{pos} of {len(diffs)} seeds above zero"


def num(value: float, fmt: str) -> str:
    """format(value, fmt), in scientific notation where fmt would round a non-zero value to 0."""
    digits = int(fmt.strip("+").rstrip("f").lstrip("."))
    if value and abs(value) < 0.5 * 10 ** -digits:
        return format(value, ("+" if fmt.startswith("+") else "") + ".1e")
    return format(value, fmt)


def reading(summary: dict, pairs: dict, args) -> str:
    """What the numbers say, computed from them, and what this size cannot show."""
    n = len(args.seeds)

    def diff(pair, m, f=".4f"):
        p = pairs[pair][m]
        return f"{num(p['mean'], '+' + f)} ± {num(p['std'], f)} ({sign_count(p['per_seed'])})"

    def resolved(pair, m):  # the paired mean is at least 2 standard errors from zero
        p = pairs[pair][m]
        return n > 1 and abs(p["mean"]) > 0 and abs(p["mean"]) >= 2 * p["std"] / math.sqrt(n)

    f = {arm: summary[arm]["forgetting"]["mean"] for arm in ARMS}
    lines = [
        f"- Forgetting (pretraining-valid loss after IFT minus before): MoC-frozen {f['moc_frozen']:+.4f}, "
        f"MoC-trained {f['moc_trained']:+.4f}, vanilla {f['vanilla']:+.4f}. Paired differences: frozen − vanilla "
        f"{diff('moc_frozen-vanilla', 'forgetting')}, trained − vanilla {diff('moc_trained-vanilla', 'forgetting')}, "
        f"frozen − trained {diff('moc_frozen-moc_trained', 'forgetting')}.",
        f"- Pretraining-valid loss after IFT, frozen − vanilla: {diff('moc_frozen-vanilla', 'pretrain_after')}; "
        f"it already differed before IFT by {diff('moc_frozen-vanilla', 'pretrain_before')}.",
        f"- IFT-valid loss, frozen − vanilla {diff('moc_frozen-vanilla', 'ift_valid')}, trained − vanilla "
        f"{diff('moc_trained-vanilla', 'ift_valid')}, frozen − trained "
        f"{diff('moc_frozen-moc_trained', 'ift_valid')}.",
        f"- Local-task accuracy ({args.eval_limit or 40} four-way questions, chance 0.25; one question is "
        f"{1 / (args.eval_limit or 40):.3f}): change through IFT, "
        f"frozen − vanilla {diff('moc_frozen-vanilla', 'acc_change', '.3f')}, trained − vanilla "
        f"{diff('moc_trained-vanilla', 'acc_change', '.3f')}.",
    ]
    bank = {arm: summary[arm]["bank_drift"]["mean"] for arm in ARMS}
    rest = {arm: summary[arm]["backbone_drift"]["mean"] for arm in ARMS}
    lines.append(f"- How far IFT moved the weights (relative L2 change): bank {bank['moc_frozen']:.2g} (frozen), "
                 f"{bank['moc_trained']:.2g} (trained); all other weights {rest['moc_frozen']:.2g} (MoC-frozen), "
                 f"{rest['moc_trained']:.2g} (MoC-trained), {rest['vanilla']:.2g} (vanilla).")
    names = {"forgetting": "forgetting", "pretrain_after": "pretrain-valid loss after IFT",
             "ift_valid": "IFT-valid loss", "acc_change": "accuracy change"}
    verdict = []
    for m, label in names.items():
        for a, b in PAIRS:
            p = pairs[f"{a}-{b}"][m]
            if resolved(f"{a}-{b}", m):
                se = p["std"] / math.sqrt(n)
                verdict.append(f"{label} {short(a)} − {short(b)} ({p['mean'] / se:+.1f} SE)" if se else
                               f"{label} {short(a)} − {short(b)} (the same in every seed)")
    lines.append("- Paired means at least 2 standard errors (std / sqrt(n), n = {}) from zero: {}.".format(
        n, "; ".join(verdict) if verdict else "none"))
    return "\n".join(lines)


CAVEATS = (
    "What this cannot show at this size: the models have {moc_params:.2f}M (MoC, {bank_params:.2f}M of it the bank) "
    "and {vanilla_params:.2f}M (vanilla, {vanilla_layers} layers) parameters, pretraining reads {pre_tokens:,} tokens "
    "(about one epoch of the 0.6M-token corpus) and IFT {ift_tokens:,}, so neither model has much knowledge to lose "
    "and \"forgetting\" is mostly the drift of a small model towards the chat format. The bank-trained arm uses the "
    "paper's IFT bank LR ratio (bank : backbone = 1 : 6); in this short IFT that moves the bank by "
    "{bank_drift:.1%} (relative L2), against {backbone_drift:.0%} for the other weights, so frozen and trained can "
    "hardly differ here. The chat set is derived from the same docstrings as the pretraining corpus and the local "
    "task (its answers are the docstrings' summaries), so IFT also rehearses the facts the task asks about, in "
    "another format; the task's {questions} questions resolve accuracy only to {step:.3f}, and lm-eval's standard "
    "error of one accuracy near 0.45 is about {stderr:.2f}. FLOPs are matched, parameters and memory capacity are "
    "not: vanilla reaches MoC's FLOPs with {vanilla_layers} layers against MoC's 4, so it has more trainable backbone "
    "to drift. Three seeds give a spread, not a test; the paper's claim is about models 100x larger and IFT runs "
    "100x longer.")


def report(results: Path, raw: dict, args, timing: dict) -> None:
    summary, pairs = summarise(raw), paired(raw)
    results.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(timing, ift_lrs=list(map(str, quickstart.IFT_LRS)), ift_flags=IFT_FLAGS,
                    routing=list(map(str, quickstart.CHUNK_ROUTING)), **model_sizes(args.seq_length))
    doc = {"settings": settings, "seeds": args.seeds, "arms": list(ARMS), "base": BASE, "raw": raw,
           "summary": summary, "paired": pairs}
    (results / "retention.json").write_text(json.dumps(doc, indent=1))
    figure = plot(results / "retention.png", raw, summary, pairs, args)
    table = tables(summary, pairs)
    counts = getattr(args, "eval_counts", {})
    whole = counts.get("pretrain") == getattr(args, "pretrain_valid_total", None)
    note = (f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); pretraining {args.iters} steps and IFT "
            f"{args.ift_iters} steps of 8 x {args.seq_length} tokens; losses on {counts.get('pretrain', '?')} "
            f"sequences of the pretraining validation split ({'all of it' if whole else 'the first'}) and on "
            f"the {counts.get('ift', '?')} packed windows of held-out chat conversations; accuracy on moc_pydoc_mc "
            f"{f'(first {args.eval_limit} questions)' if args.eval_limit else '(40 questions)'}"
            f". Mean ± sample std over seeds. Runtime {timing['runtime_s'] / 60:.1f} min (training "
            f"{timing['training_s'] / 60:.1f}, evaluation {timing['evaluation_s'] / 60:.1f})"
            + (f"; {len(args.reused)} trained checkpoints reused." if args.reused else "."))
    caveats = CAVEATS.format(moc_params=settings["moc_params"]["total"] / 1e6,
                             bank_params=settings["moc_params"]["bank"] / 1e6,
                             vanilla_params=settings["vanilla_params"]["total"] / 1e6,
                             vanilla_layers=settings["vanilla_layers"], pre_tokens=args.iters * 8 * args.seq_length,
                             ift_tokens=args.ift_iters * 8 * args.seq_length,
                             bank_drift=summary["moc_trained"]["bank_drift"]["mean"],
                             backbone_drift=summary["moc_trained"]["backbone_drift"]["mean"],
                             questions=args.eval_limit or 40, step=1 / (args.eval_limit or 40),
                             stderr=math.sqrt(0.45 * 0.55 / ((args.eval_limit or 40) - 1)))
    text = (f"{table}\n\n{note}\n\nReading:\n\n{reading(summary, pairs, args)}\n\n"
            f"{caveats}\n\n![retention](retention.png)\n")
    (results / "retention.md").write_text(text)
    print("\n" + table + "\n\n" + note + "\n\n" + reading(summary, pairs, args))
    print(f"\nwrote {results / 'retention.md'}, {results / 'retention.json'}, {figure}")


def model_sizes(seq: int) -> dict:
    """Parameters and forward FLOPs per sequence of both pretrained models (moc_megatron.accounting)."""
    from moc_megatron.accounting import count_parameters, estimate_flops
    from moc_megatron.config import load_config

    layers = quickstart.vanilla_flags({"seq": seq})[-1]
    tiny = ROOT / "configs/train/moc-tiny.yaml"
    moc = load_config(tiny, training={"seq_length": seq}, memory={"routing_unit": "chunk", "routing_chunk": 32})
    vanilla = load_config(tiny, training={"seq_length": seq}, memory={"layers": []}, model={"num_layers": layers})
    return {"vanilla_layers": layers, "moc_params": count_parameters(moc), "vanilla_params": count_parameters(vanilla),
            "moc_forward_flops": estimate_flops(moc, seq).forward_flops,
            "vanilla_forward_flops": estimate_flops(vanilla, seq).forward_flops}


def plot(path: Path, raw: dict, summary: dict, pairs: dict, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(19, 3.9))
    x = range(len(ARMS))
    colors = {"moc_frozen": "C0", "moc_trained": "C2", "vanilla": "C1"}

    def bars(ax, metric, offset=0.0, width=0.6, hatch=None, label=None, alpha=1.0):
        means = [summary[a][metric]["mean"] for a in ARMS]
        stds = [summary[a][metric]["std"] for a in ARMS]
        ax.bar([i + offset for i in x], means, width, yerr=stds, capsize=3, color=[colors[a] for a in ARMS],
               hatch=hatch, alpha=alpha, label=label, edgecolor="black", linewidth=0.5)
        for i, a in enumerate(ARMS):  # one dot per seed
            ax.plot([i + offset] * len(raw[a][metric]), raw[a][metric], "k.", markersize=4)

    def finish(ax, title, ylabel):
        ax.set_xticks(list(x), [short(a) for a in ARMS], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)

    ax = axes[0]
    bars(ax, "pretrain_before", -0.2, 0.4, label="before IFT", alpha=0.45)
    bars(ax, "pretrain_after", 0.2, 0.4, hatch="//", label="after IFT")
    lo = min(min(raw[a]["pretrain_before"] + raw[a]["pretrain_after"]) for a in ARMS)
    hi = max(max(raw[a]["pretrain_before"] + raw[a]["pretrain_after"]) for a in ARMS)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
    ax.legend(fontsize=7)
    finish(ax, "pretraining-valid loss", "lm loss")
    ax = axes[1]
    bars(ax, "forgetting")
    ax.axhline(0, color="black", linewidth=0.8)
    finish(ax, "forgetting (after − before)", "Δ lm loss")
    ax = axes[2]
    bars(ax, "ift_valid")
    lo = min(min(raw[a]["ift_valid"]) for a in ARMS)
    hi = max(max(raw[a]["ift_valid"]) for a in ARMS)
    ax.set_ylim(lo - 0.3 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    finish(ax, "IFT-valid loss (assistant tokens)", "lm loss")
    ax = axes[3]
    bars(ax, "acc_before", -0.2, 0.4, label="before IFT", alpha=0.45)
    bars(ax, "acc_after", 0.2, 0.4, hatch="//", label="after IFT")
    ax.axhline(0.25, color="gray", linestyle="--", linewidth=0.8, label="chance")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    finish(ax, "local task (moc_pydoc_mc) accuracy", "acc")
    ax = axes[4]
    for j, (m, label) in enumerate((("forgetting", "forgetting"), ("pretrain_after", "pretrain-valid after"),
                                    ("ift_valid", "IFT-valid"))):
        offset = (j - 1) * 0.27
        p = [pairs[f"{a}-{b}"][m] for a, b in PAIRS]
        ax.bar([i + offset for i in range(len(PAIRS))], [q["mean"] for q in p], 0.27, yerr=[q["std"] for q in p],
               capsize=3, color=f"C{j + 4}", label=label, edgecolor="black", linewidth=0.5)
        for i, q in enumerate(p):
            ax.plot([i + offset] * len(q["per_seed"]), q["per_seed"], "k.", markersize=4)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(PAIRS)), [f"{short(a)}\n− {short(b)}" for a, b in PAIRS], fontsize=8)
    ax.set_title("paired by seed (per-seed diffs)", fontsize=10)
    ax.set_ylabel("Δ lm loss", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"Retention through instruction tuning: {len(args.seeds)} seeds (dots), mean ± std; "
                 f"pretrain {args.iters} steps, IFT {args.ift_iters} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
