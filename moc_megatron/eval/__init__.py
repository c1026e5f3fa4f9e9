"""Evaluation with lm-evaluation-harness (an optional dependency: lm_eval[hf]).

    run.py            moc-eval: lm-eval on an export (--hf-model) or a checkpoint (--checkpoint, exported first)
    lm_eval_model.py  --model moc: lm-eval's HFLM passing the attention mask, so scores do not depend on batching
    pydoc_task.py     writes the local task moc_pydoc_mc (tools/eval_tasks) from the embedded corpus

Nothing here is imported by training; lm_eval is imported only by these modules.
"""
