"""Evaluation (lm-evaluation-harness): the harness scores an export as the training model does, whatever
the batch size.

The reference is the training model (moc_megatron.model.gpt.MoCModel) on each request alone, unpadded,
with the continuation's tokens from sentencepiece itself: never the HF code or the harness. The tiny
models are exported with a sentencepiece tokenizer trained on the local task's own text.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_hf import CASES, SPM_SETTINGS, tiny_config, training_model

from moc_megatron.hf.convert import save_hf

lm_eval = pytest.importorskip("lm_eval")
spm = pytest.importorskip("sentencepiece")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import moc_megatron.eval.lm_eval_model  # noqa: E402,F401  registers --model moc
from moc_megatron.eval import pydoc_task  # noqa: E402
from moc_megatron.eval.run import BUNDLED_TASKS, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK, VOCAB = "moc_pydoc_mc", 512
ROUTING = {"sequence": CASES["sequence"], "chunk": CASES["chunk"], "rolling": CASES["rolling_pooling"]}
PADDED = dict(ROUTING, chunk_shared_only_rolling=CASES["chunk_shared_only_rolling"])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A sentencepiece model (the project's BPE settings) trained on the task's questions and choices."""
    d = tmp_path_factory.mktemp("spm")
    rows = [json.loads(line) for line in (BUNDLED_TASKS / f"{TASK}.jsonl").read_text().splitlines()]
    (d / "text.txt").write_text("\n".join([r["signature"] for r in rows] + [c for r in rows for c in r["choices"]]))
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "sp"), vocab_size=400,
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   **SPM_SETTINGS["project_bpe"])
    return d / "sp.model"


@pytest.fixture(scope="module")
def exports(ctx, sp_model, tmp_path_factory):
    """routing case -> (training model, export dir), built once per case."""
    built = {}

    def get(case):
        if case not in built:
            cfg = tiny_config(str(ROOT), model={"vocab_size": VOCAB}, training={"seq_length": 256},
                              memory=dict(PADDED[case]))
            model = training_model(ctx, cfg)
            out = tmp_path_factory.mktemp(case) / "hf"
            save_hf(model.state_dict(), cfg.to_dict(), out, tokenizer_model=sp_model)
            built[case] = model, out
        return built[case]

    return get


def harness_scores(model_dir, batch_size, model="moc", limit=4) -> dict:
    """(context, continuation) -> log-likelihood, from lm-eval's simple_evaluate on the local task."""
    manager = TaskManager(include_path=[str(BUNDLED_TASKS)], include_defaults=False)
    out = simple_evaluate(model=model, model_args={"pretrained": str(model_dir), "trust_remote_code": True},
                          tasks=[TASK], task_manager=manager, limit=limit, batch_size=batch_size, device="cpu",
                          log_samples=True, bootstrap_iters=0)
    scores = {}
    for sample in out["samples"][TASK]:
        for args, resp in zip(sample["arguments"], sample["resps"]):
            scores[tuple(args)] = float(resp[0][0])
    return scores


def training_model_score(model, sp, context: str, continuation: str) -> float:
    """Sum of log p(continuation token) under the training model, the request alone; the continuation's
    tokens are those of (context + continuation) after the context's, as lm-eval splits them."""
    whole, ctx_ids = sp.encode(context + continuation), sp.encode(context)
    cont = whole[len(ctx_ids):]
    inp = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs = model(inp).logits.float().log_softmax(-1)[0, -len(cont):]  # (n, vocab)
    return logprobs.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) for k in a)


def close(a: float, b: float, atol: float = 1e-5) -> bool:
    """Within atol plus fp32 round-off of the sum (the scores of these random models are ~ -200 nats)."""
    return abs(a - b) <= atol + 1e-7 * abs(b)


# ---------------------------------------------------------------------------------------------
# Through the harness


@pytest.mark.slow
@pytest.mark.parametrize("case", ROUTING)
def test_harness_loglikelihoods_equal_training_model_at_any_batch_size(exports, sp_model, case):
    model, hf_dir = exports(case)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    batched, alone = harness_scores(hf_dir, batch_size=4), harness_scores(hf_dir, batch_size=1)
    reference = {k: training_model_score(model, sp, *k) for k in batched}
    vs_training, vs_batch = max_diff(batched, reference), max_diff(batched, alone)
    print(f"{case}: {len(batched)} requests; |harness bs 4 - training model| <= {vs_training:.3g}, "
          f"|bs 4 - bs 1| <= {vs_batch:.3g}")
    assert all(close(batched[k], reference[k], atol=1e-4) for k in batched)
    assert all(close(batched[k], alone[k]) for k in batched)


@pytest.mark.slow
def test_stock_hf_class_depends_on_batch_size_with_sequence_routing_only(exports):
    """lm-eval's --model hf pads with token 0 and passes no mask: sequence routing pools the padding,
    chunk routing is causal and does not see it."""
    diffs = {}
    for case in ("sequence", "chunk"):
        _, hf_dir = exports(case)
        diffs[case] = max_diff(harness_scores(hf_dir, batch_size=4, model="hf"), harness_scores(hf_dir, batch_size=1))
    print(f"--model hf, |bs 4 - bs 1|: sequence routing {diffs['sequence']:.3g}, chunk routing {diffs['chunk']:.3g}")
    assert diffs["sequence"] > 1e-3
    assert diffs["chunk"] <= 1e-5


# ---------------------------------------------------------------------------------------------
# The HF model on padded batches


def requests(n=6, seed=0):
    """(tokens, continuation length) of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length, cont = int(torch.randint(5, 30, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        out.append((torch.randint(0, VOCAB, (length,), generator=g), cont))
    return out


def padded(batch, side):
    width = max(len(t) for t, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (t, _) in enumerate(batch):
        cols = slice(0, len(t)) if side == "right" else slice(width - len(t), width)
        ids[i, cols], mask[i, cols] = t, 1
    return ids, mask


def hf_scores(hf, batch, side):
    """Continuation log-likelihoods of a padded batch, through the HF model with its attention mask."""
    ids, mask = padded(batch, side)
    with torch.no_grad():
        logprobs = hf(ids, attention_mask=mask).logits.log_softmax(-1)
    scores = []
    for row, row_mask, (t, cont) in zip(logprobs, mask, batch):
        row = row[row_mask.bool()][len(t) - 1 - cont:len(t) - 1]
        scores.append(row.gather(-1, t[-cont:, None]).sum().item())
    return scores


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", PADDED)
def test_padded_batch_scores_equal_each_request_alone(exports, case, side):
    _, hf_dir = exports(case)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    reqs = requests()
    alone = [hf_scores(hf, [r], side)[0] for r in reqs]
    batched = hf_scores(hf, reqs[:4], side) + hf_scores(hf, reqs[4:], side)
    diff = max(abs(a - b) for a, b in zip(alone, batched))
    print(f"{case}, {side} padding: max |batch of 4 - alone| = {diff:.3g}")
    assert all(close(a, b) for a, b in zip(batched, alone))


@pytest.mark.parametrize("case", PADDED)
def test_training_model_valid_path_equals_hf_on_a_right_padded_batch(exports, case):
    """MoCModel.forward(tokens, valid=...) and the HF model with attention_mask, valid positions compared;
    the training model takes right padding only (its attention has no key mask)."""
    model, hf_dir = exports(case)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True).eval()
    ids, mask = padded(requests(n=4, seed=1), "right")
    with torch.no_grad():
        train = model(ids, valid=mask.bool()).logits
        exported = hf(ids, attention_mask=mask).logits
    diff = (train - exported)[mask.bool()].abs().max().item()
    print(f"{case}: max |training(valid) - HF(attention_mask)| over valid positions = {diff:.3g}")
    assert diff <= 1e-4


# ---------------------------------------------------------------------------------------------
# moc-eval


@pytest.mark.slow
def test_moc_eval_on_checkpoint_equals_on_export_and_writes_lm_eval_files(exports, sp_model, tmp_path):
    """--checkpoint goes through the export code: a checkpoint imported from an export scores as the export."""
    _, hf_dir = exports("sequence")
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/convert_from_hf.py"), "--hf-model", str(hf_dir),
                           "--save", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ)  # moc-eval drops a stray LOCAL_RANK (ctx sets one) itself
    runs = {}
    for name, source in (("export", ["--hf-model", str(hf_dir)]),
                         ("checkpoint", ["--checkpoint", str(ckpt), "--tokenizer-model", str(sp_model)])):
        proc = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), *source, "--tasks", TASK,
                               "--limit", "3", "--batch-size", "4", "--log-samples",
                               "--output-path", str(tmp_path / name)], capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "|moc_pydoc_mc|" in proc.stdout and "acc_norm" in proc.stdout  # lm-eval's table
        results = list((tmp_path / name).glob("*/results_*.json"))
        samples = list((tmp_path / name).glob(f"*/samples_{TASK}_*.jsonl"))
        assert len(results) == 1 and len(samples) == 1
        runs[name] = [json.loads(line)["resps"] for line in samples[0].read_text().splitlines()]
        assert json.loads(results[0].read_text())["n-samples"][TASK]["effective"] == 3
    assert runs["export"] == runs["checkpoint"]


def test_moc_eval_refuses_bad_input_naming_the_flag(exports, tmp_path, capsys):
    _, hf_dir = exports("chunk")
    no_tokenizer = tmp_path / "no-tok"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    cases = [
        (["--hf-model", str(tmp_path / "nope"), "--tasks", TASK], "--hf-model"),
        (["--hf-model", str(no_tokenizer), "--tasks", TASK], "no tokenizer files"),
        (["--checkpoint", str(tmp_path / "nope"), "--tasks", TASK], "--checkpoint"),
        (["--hf-model", str(hf_dir), "--tasks", TASK, "--log-samples"], "--output-path"),
        (["--hf-model", str(hf_dir), "--tasks", TASK, "--batch-size", "0"], "--batch-size 0"),
        (["--hf-model", str(hf_dir), "--tasks", TASK, "--limit", "-1"], "--limit"),
        (["--hf-model", str(hf_dir), "--tasks", TASK, "--include-path", str(tmp_path / "nope")], "--include-path"),
        (["--hf-model", str(hf_dir), "--tasks", TASK, "--iteration", "3"], "--iteration"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_moc_eval_names_unknown_tasks(exports, capsys):
    _, hf_dir = exports("chunk")
    assert main(["--hf-model", str(hf_dir), "--tasks", f"{TASK},no_such_task"]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err


def test_local_task_is_derived_from_the_corpus_deterministically():
    config = yaml.safe_load((BUNDLED_TASKS / f"{TASK}.yaml").read_text().replace("!function", ""))
    rows = [json.loads(line) for line in (BUNDLED_TASKS / f"{TASK}.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)
    assert len({r["id"] for r in rows}) == 40 and len({r["label"] for r in rows}) == 4
    if config["metadata"]["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"the questions come from Python {config['metadata']['python']}'s docstrings")
    assert pydoc_task.questions(40) == rows
