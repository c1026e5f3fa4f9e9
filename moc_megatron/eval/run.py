"""Run lm-evaluation-harness on an exported model or straight on a training checkpoint.

    moc-eval (--hf-model DIR | --checkpoint DIR [--iteration N] [--tokenizer-model M]) --tasks T[,T...]
             [--include-path P] [--num-fewshot N] [--batch-size N|auto] [--output-path P] [--log-samples]
             [--limit N] [--model moc|hf] [--device D]

A checkpoint is first exported to a temporary directory by moc_megatron.training.export (any TP x PP x EP
layout). ``--model moc`` (default) is moc_megatron.eval.lm_eval_model.MoCLM, which passes the attention mask
so that scores do not depend on the batch size; ``--model hf`` is lm-eval's stock class. The evaluation
flags are lm-eval's own, dashed; the output is lm-eval's results (and samples) files and its table. The
task ``moc_pydoc_mc`` in tools/eval_tasks is always on the include path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from moc_megatron.errors import UserError

BUNDLED_TASKS = Path(__file__).resolve().parents[2] / "tools" / "eval_tasks"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moc-eval", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-model", help="an exported Hugging Face directory (moc-convert-hf)")
    src.add_argument("--checkpoint", help="the --save directory of a training run; exported to a temporary directory")
    p.add_argument("--iteration", type=int, help="with --checkpoint: default the one named in 'latest'")
    p.add_argument("--tokenizer-model", help="with --checkpoint: sentencepiece .model (default: the run's "
                                             "--tokenizer-model)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include-path", help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", default="1", help="an integer, 'auto' or 'auto:N'")
    p.add_argument("--output-path", help="directory for lm-eval's results (and samples) files")
    p.add_argument("--log-samples", action="store_true", help="also write every request and its scores")
    p.add_argument("--limit", type=float, help="examples per task (below 1: a fraction of them)")
    p.add_argument("--model", default="moc", choices=("moc", "hf"),
                   help="lm-eval model class: moc passes the attention mask, hf is lm-eval's stock class")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before anything is loaded, naming the flag."""
    if args.checkpoint is None and (args.iteration is not None or args.tokenizer_model is not None):
        raise UserError("--iteration and --tokenizer-model go with --checkpoint (an export has its tokenizer)")
    if args.hf_model is not None:
        check_hf_dir(Path(args.hf_model), "--hf-model")
    if args.tokenizer_model is not None and not Path(args.tokenizer_model).is_file():
        raise UserError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UserError(f"--include-path {args.include_path}: no such directory")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot {args.num_fewshot}: must be 0 or more")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit:g}: must be positive (a count, or a fraction below 1)")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    if args.log_samples and args.output_path is None:
        raise UserError("--log-samples writes the samples next to the results: give --output-path")
    args.batch_size = parse_batch_size(args.batch_size)


def parse_batch_size(text: str) -> int | str:
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) > 0):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"--batch-size {text}: expected a positive integer, 'auto' or 'auto:N'")


def check_hf_dir(path: Path, flag: str) -> None:
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such directory")
    if not (path / "config.json").exists():
        raise UserError(f"{flag} {path}: no config.json (not a Hugging Face export; see moc-convert-hf)")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{flag} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); lm-eval needs one: "
                        "export with moc-convert-hf --tokenizer-model")


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager over the bundled and --include-path tasks, and lm-eval's own only when a task
    is not found there (indexing lm-eval's thousands of YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(BUNDLED_TASKS)] + ([str(Path(include_path).resolve())] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if set(tasks) - set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise UserError(f"--tasks: unknown task(s) {', '.join(unknown)} (not in lm-eval, {BUNDLED_TASKS} "
                        f"or --include-path); `lm-eval ls tasks` lists lm-eval's")
    return manager


def export_checkpoint(args: argparse.Namespace, out: Path) -> Path:
    """The checkpoint, merged and exported by the export tool's own functions, with a tokenizer."""
    from moc_megatron.hf import save_hf
    from moc_megatron.training.export import merged_state_dict, resolve_tag

    path = resolve_tag(args.checkpoint, args.iteration)
    cfg, state = merged_state_dict(path)
    tokenizer = args.tokenizer_model or cfg.get("training", {}).get("tokenizer_model")
    if not tokenizer or not str(tokenizer).endswith(".model") or not Path(tokenizer).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: the run names no sentencepiece tokenizer file "
                        f"(its --tokenizer-model is {tokenizer!r}); pass --tokenizer-model")
    hf = save_hf(state, cfg, out / Path(path).name, tokenizer_model=tokenizer)
    print(f"exported {path} to {hf}", flush=True)
    return hf


def evaluate(args: argparse.Namespace, model_dir: Path, source: str) -> dict:
    """lm-eval's simple_evaluate; its results (and samples) files written as its CLI writes them."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import sanitize_model_name

    import moc_megatron.eval.lm_eval_model  # noqa: F401  registers --model moc

    tasks = [t for t in args.tasks.split(",") if t]
    manager = task_manager(tasks, args.include_path)
    warn_stock_class(args.model, model_dir)
    tracker = EvaluationTracker(output_path=args.output_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_args = {"pretrained": str(model_dir.resolve()), "trust_remote_code": True}
    results = simple_evaluate(model=args.model, model_args=model_args, tasks=tasks, num_fewshot=args.num_fewshot,
                              batch_size=args.batch_size, device=device, limit=args.limit,
                              log_samples=args.log_samples, evaluation_tracker=tracker, task_manager=manager)
    if results is None:  # a non-zero rank of a distributed run
        return {}
    tracker.general_config_tracker.model_name = source  # name the results after what was asked for, not a temp dir
    tracker.general_config_tracker.model_name_sanitized = sanitize_model_name(source)
    samples = results.pop("samples", None) if args.log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"] if samples else ():
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


def warn_stock_class(model: str, model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    pooled = config.get("model_type") == "moc" and config.get("memory_layers") and \
        config.get("memory_routing_unit") == "sequence"
    if model == "hf" and pooled:
        print("warning: --model hf with sequence routing: lm-eval's stock class passes no attention mask, so the "
              "router pools over padding and scores depend on --batch-size; use --model moc", file=sys.stderr)


def print_results(results: dict, args: argparse.Namespace) -> None:
    from lm_eval.utils import make_table

    print(f"{args.model} ({args.hf_model or args.checkpoint}), limit: {args.limit}, num_fewshot: {args.num_fewshot}, "
          f"batch_size: {args.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))


class _NoCustomDatasetAdvice(logging.Filter):
    """lm-eval advises --metadata for every task with a custom_dataset; moc_pydoc_mc takes none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" in os.environ and "RANK" not in os.environ:
        # a stray LOCAL_RANK (left by a launcher or a test harness) makes accelerate, under lm-eval,
        # start torch.distributed, which then fails for want of RANK: moc-eval runs as one process
        os.environ.pop("LOCAL_RANK")
    try:
        check_args(args)
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UserError("moc-eval needs lm-evaluation-harness: pip install 'lm_eval[hf]==0.4.13'") from None
        logging.getLogger("lm_eval.api.task").addFilter(_NoCustomDatasetAdvice())
        with tempfile.TemporaryDirectory(prefix="moc-eval-") as tmp:
            model_dir = Path(args.hf_model) if args.hf_model else export_checkpoint(args, Path(tmp))
            results = evaluate(args, model_dir, args.hf_model or args.checkpoint)
        if results:
            print_results(results, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
