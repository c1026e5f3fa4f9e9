"""The quickstart (`make demo`): corpus -> tokenizer -> indexed dataset -> MoC and matched vanilla on
2 ranks -> instruction tuning with the bank frozen -> Hugging Face export with --verify -> generation
-> lm-eval on the local task -> a figure (demo_out/quickstart.png: validation curves, chapter usage).

    python tools/quickstart.py [--out demo_out] [--quick]

Finished stages (corpus, tokenizer, dataset, each training run) are reused when rerun; `make
demo-clean` removes demo_out/. --quick shrinks every stage (the test runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALE = {  # stage sizes: full demo (< 15 min on 2 CPU cores) and the test's --quick
    "full": {"iters": 250, "ift_iters": 40, "eval_interval": 50, "seq": 128, "docs": 0, "eval_limit": None},
    "quick": {"iters": 6, "ift_iters": 2, "eval_interval": 3, "seq": 64, "docs": 400, "eval_limit": 4},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    out, scale = Path(args.out).resolve(), SCALE["quick" if args.quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    corpus, chat = stage_corpus(out, scale)
    tokenizer = stage_tokenizer(out, corpus)
    data = stage_dataset(out, corpus, tokenizer)
    moc = stage_train(out, "moc", data, tokenizer, scale, moc_flags())
    vanilla = stage_train(out, "vanilla", data, tokenizer, scale, vanilla_flags(scale))
    ift = stage_ift(out, chat, tokenizer, scale)
    hf = stage_export(out, ift, tokenizer)
    completion = stage_generate(hf)
    scores = stage_evaluate(out, {"moc": out / "checkpoints" / "moc", "vanilla": out / "checkpoints" / "vanilla"},
                            tokenizer, scale)
    figure = stage_figure(out, {"MoC (EP=2, chunk)": moc, "vanilla, same FLOPs": vanilla}, out / "tensorboard" / "moc")
    summary(out, moc, vanilla, hf, completion, time.time() - started, scores, figure)
    return 0


# ---------------------------------------------------------------------------------------------


def stage(name: str, done: Path):
    """Print the stage header; True when its output already exists (reused)."""
    reused = done.exists()
    print(f"\n=== {name}" + (f" (reusing {done.relative_to(done.parents[1])})" if reused else ""), flush=True)
    return reused


def run(cmd: list, log: Path | None = None) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    with (open(log, "w") if log else open(os.devnull, "w")) as f:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if not _noise(line):
                print("  " + line.rstrip(), flush=True)
    if proc.wait():
        raise SystemExit(f"quickstart: stage failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")


def _noise(line: str) -> bool:
    return any(s in line for s in ("warnings.warn", "Warning:", "[WARNING]", "UserWarning"))


def py(*args) -> list:
    return [sys.executable, *args]


def stage_corpus(out: Path, scale: dict):
    corpus_dir = out / "corpus"
    corpus, chat = corpus_dir / "pydoc_corpus.jsonl", corpus_dir / "pydoc_chat.jsonl"
    if not stage("1/7 corpus: the Python interpreter's own documentation", chat):
        corpus_dir.mkdir(exist_ok=True)
        run(py("tools/make_corpus.py", "--output-dir", corpus_dir))
        if scale["docs"]:  # --quick: the first documents only
            lines = corpus.read_text().splitlines()[: scale["docs"]]
            corpus.write_text("\n".join(lines) + "\n")
    return corpus, chat


def stage_tokenizer(out: Path, corpus: Path) -> Path:
    model = out / "tokenizer" / "moc.model"
    if not stage("1/7 tokenizer: sentencepiece BPE, 4096 pieces", model):
        model.parent.mkdir(exist_ok=True)
        run(py("tools/train_tokenizer.py", "--input", corpus, "--json-key", "text", "--model-prefix",
               model.with_suffix(""), "--vocab-size", 4096, "--model-type", "bpe"))
    return model


def stage_dataset(out: Path, corpus: Path, tokenizer: Path) -> Path:
    prefix = out / "data" / "pydoc"
    data = Path(f"{prefix}_text_document")
    if not stage("2/7 dataset: Megatron indexed format, 2 workers", Path(f"{data}.idx")):
        prefix.parent.mkdir(exist_ok=True)
        run(py("tools/preprocess_data.py", "--input", corpus, "--json-keys", "text", "--output-prefix", prefix,
               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--append-eod",
               "--workers", 2))
    return data


# Causal chunk routing (chunks of 32 tokens), so the exported model generates exactly as it was trained.
CHUNK_ROUTING = ["--memory-routing-unit", "chunk", "--memory-routing-chunk", 32]
# Instruction tuning's peak learning rates (backbone, memory layers), 10x the paper's recipe
# (configs/train/moc-paper-ift.yaml) for this short run; the floor is 0.1x the peak.
IFT_LRS = ["--lr", "3e-4", "--min-lr", "3e-5", "--memory-layer-lr", "1.5e-4"]


def moc_flags() -> list:
    """MoC on 2 ranks with chapter parallelism (each rank owns 64 of the 128 routed chapters) and
    causal chunk routing."""
    return ["--expert-model-parallel-size", 2, *CHUNK_ROUTING]


def vanilla_flags(scale: dict) -> list:
    """The same backbone without memory, as deep as the estimator says matches MoC's FLOPs."""
    from moc_megatron.accounting import matched_vanilla_layers
    from moc_megatron.config import load_config

    cfg = load_config(ROOT / "configs/train/moc-tiny.yaml", training={"seq_length": scale["seq"]},
                      memory={"routing_unit": "chunk", "routing_chunk": 32})
    layers = matched_vanilla_layers(cfg, scale["seq"])
    return ["--memory-layers", "--num-layers", layers]


def train_cmd(out: Path, name: str, tokenizer: Path, scale: dict, iters: int) -> list:
    from moc_megatron.parallel.net import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", 2, "--master-port", free_port(), "-m", "moc_megatron.train",
            "--config", "configs/train/moc-tiny.yaml", "--no-mock-data", "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--seq-length", scale["seq"],
            "--train-iters", iters, "--lr-warmup-iters", min(20, iters // 4), "--eval-interval",
            scale["eval_interval"], "--log-interval", max(1, scale["eval_interval"] // 2),
            "--save", out / "checkpoints" / name, "--tensorboard-dir", out / "tensorboard" / name,
            "--log-jsonl", out / "logs" / f"{name}.jsonl", "--zero-stage", 1]


def stage_train(out: Path, name: str, data: Path, tokenizer: Path, scale: dict, extra: list) -> Path:
    log = out / "logs" / f"{name}.jsonl"
    if not stage(f"3-4/7 train {name} on 2 ranks ({scale['iters']} steps)", out / "checkpoints" / name / "latest"):
        (out / "logs").mkdir(exist_ok=True)
        run(train_cmd(out, name, tokenizer, scale, scale["iters"]) + ["--data-path", data, "--split", "95,5,0"]
            + extra, out / "logs" / f"{name}.log")
    return log


def stage_ift(out: Path, chat: Path, tokenizer: Path, scale: dict) -> Path:
    ckpt = out / "checkpoints" / "moc-ift"
    if not stage(f"5/7 instruction tuning on the derived chat set, bank frozen ({scale['ift_iters']} steps)",
                 ckpt / "latest"):
        cmd = train_cmd(out, "moc-ift", tokenizer, scale, scale["ift_iters"]) + moc_flags() + [
            "--load", out / "checkpoints" / "moc", "--finetune", "--chat-data", chat, "--freeze-memory-bank",
            *IFT_LRS, "--split", "95,5,0"]
        run(cmd, out / "logs" / "moc-ift.log")
    return ckpt


def stage_export(out: Path, ckpt: Path, tokenizer: Path) -> Path:
    hf = out / "hf" / "moc-tiny-ift"
    if not stage("6/7 export to Hugging Face with --verify", hf / "config.json"):
        run(py("tools/convert_to_hf.py", "--checkpoint", ckpt, "--output", hf, "--tokenizer-model", tokenizer,
               "--verify"), out / "logs" / "export.log")
    return hf


def stage_generate(hf: Path) -> str:
    print("\n=== 6/7 generate with transformers", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    prompt = "The list type in Python"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=30, do_sample=False)
    text = tok.decode(gen[0][ids.shape[1]:])
    print(f"  prompt: {prompt!r}\n  completion: {text!r}")
    return text


def stage_evaluate(out: Path, checkpoints: dict, tokenizer: Path, scale: dict) -> dict:
    """lm-eval's accuracy on the local multiple-choice task (tools/eval_tasks), per pretrained model."""
    scores = {}
    for name, ckpt in checkpoints.items():
        results = out / "eval" / name
        if not stage(f"6/7 evaluate {name} on the local task (lm-eval, moc_pydoc_mc)", results / "done"):
            limit = ["--limit", scale["eval_limit"]] if scale["eval_limit"] else []
            run(py("tools/evaluate.py", "--checkpoint", ckpt, "--tokenizer-model", tokenizer, "--tasks",
                   "moc_pydoc_mc", "--batch-size", 8, "--output-path", results, *limit),
                out / "logs" / f"eval-{name}.log")
            (results / "done").touch()
        found = sorted(results.rglob("results_*.json"))
        if found:
            task = json.loads(found[-1].read_text())["results"]["moc_pydoc_mc"]
            scores[name] = {k.split(",")[0]: v for k, v in task.items() if k.split(",")[0] in ("acc", "acc_norm")}
    return scores


def eval_curve(log: Path) -> tuple[list, list]:
    """(iterations, validation lm losses) of a run's --log-jsonl."""
    if not log.exists():
        return [], []
    recs = [r for r in map(json.loads, log.read_text().splitlines()) if "eval_lm_loss" in r]
    return [r["iteration"] for r in recs], [r["eval_lm_loss"] for r in recs]


def eval_losses(log: Path) -> list:
    return eval_curve(log)[1]


def chapter_usage(tensorboard_dir: Path) -> dict:
    """{memory layer: reads per chapter (list, by chapter id)} summed over the logged steps, from the
    trainer's TensorBoard histograms router/layer<L>/chapter_usage (training/metrics.py)."""
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    if not tensorboard_dir.exists():
        return {}
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    usage = {}
    for tag in acc.Tags().get("histograms", []):
        if tag.startswith("router/layer") and tag.endswith("/chapter_usage"):
            layer = int(tag[len("router/layer"):].split("/")[0])
            counts = None
            for event in acc.Histograms(tag):
                bucket = list(event.histogram_value.bucket)
                counts = bucket if counts is None else [a + b for a, b in zip(counts, bucket)]
            usage[layer] = counts or []
    return dict(sorted(usage.items()))


def stage_figure(out: Path, logs: dict, tensorboard_dir: Path, shared_chapters: int | None = None) -> Path | None:
    """demo_out/quickstart.png: both models' validation curves, and how often MoC read each routed
    chapter (load 1 = uniform; the always-read shared chapters are left out)."""
    print("\n=== 7/7 figure: validation curves and chapter usage", flush=True)
    try:
        import matplotlib
    except ImportError:
        print("  matplotlib is not installed (pip install -r requirements.txt): no figure")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if shared_chapters is None:
        from moc_megatron.config import load_config

        shared_chapters = load_config(ROOT / "configs/train/moc-tiny.yaml").memory.shared_chapters
    usage = chapter_usage(tensorboard_dir)
    fig = plt.figure(figsize=(11, 4.2))
    grid = fig.add_gridspec(max(len(usage), 1), 2)
    ax_loss = fig.add_subplot(grid[:, 0])
    for name, log in logs.items():
        iters, losses = eval_curve(log)
        if iters:
            ax_loss.plot(iters, losses, marker="o", label=name)
    ax_loss.set(xlabel="iteration", ylabel="validation lm loss", title="validation loss")
    ax_loss.legend()
    for row, (layer, counts) in enumerate(usage.items()):
        ax = fig.add_subplot(grid[row, 1])
        routed = counts[shared_chapters:]
        mean = sum(routed) / max(len(routed), 1)
        ids = range(shared_chapters, shared_chapters + len(routed))
        ax.bar(ids, [c / mean if mean else 0.0 for c in routed], width=1.0, color=f"C{row + 2}")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(f"layer {layer}\nload")
        if row == 0:
            ax.set_title("MoC chapter usage: reads per routed chapter / mean (1 = uniform)", fontsize=10)
        if row == len(usage) - 1:
            ax.set_xlabel("routed chapter id (summed over the logged steps)")
    fig.tight_layout()
    path, partial = out / "quickstart.png", out / "quickstart.png.tmp"
    fig.savefig(partial, dpi=110, format="png")  # a finished file or none under the name
    plt.close(fig)
    os.replace(partial, path)
    print(f"  wrote {path}")
    return path


def summary(out: Path, moc: Path, vanilla: Path, hf: Path, completion: str, seconds: float,
            scores: dict, figure: Path | None = None) -> None:
    m, v = eval_losses(moc), eval_losses(vanilla)
    print("\n=== 7/7 summary")
    print(f"  validation lm loss   first    last")
    for name, vals in (("MoC (EP=2, chunk)", m), ("vanilla, same FLOPs", v)):
        if vals:
            print(f"  {name:20s} {vals[0]:7.3f} {vals[-1]:7.3f}")
    for name, score in scores.items():
        print(f"  local task accuracy ({name}): acc {score.get('acc', float('nan')):.3f}, "
              f"acc_norm {score.get('acc_norm', float('nan')):.3f} (chance 0.25)")
    print(f"  artefacts under {out}: corpus/ tokenizer/ data/ checkpoints/ logs/ tensorboard/ hf/")
    print(f"  Hugging Face model: {hf}")
    print(f"  TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    if figure:
        print(f"  figure (validation curves, chapter usage): {figure}")
    print(f"  finished in {seconds / 60:.1f} min")
    (out / "summary.json").write_text(json.dumps({"moc_eval_lm_loss": m, "vanilla_eval_lm_loss": v,
                                                  "completion": completion, "hf": str(hf), "local_task": scores,
                                                  "figure": str(figure) if figure else None},
                                                 indent=1))


if __name__ == "__main__":
    sys.exit(main())
