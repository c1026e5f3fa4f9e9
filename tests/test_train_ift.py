"""Instruction tuning: the trainer's loss on chat data covers assistant tokens (and their <|end|>) only."""

from __future__ import annotations

import json

import pytest
import torch

from multiproc import run_ranks
from test_train import tiny, train_with_snapshot

WORDS = ["<unk>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
         "be", "brief", "what", "is", "a", "chapter", "of", "memory", "it", "slice", "the", "bank", "tell",
         "me", "more", "about", "routing", "top", "k", "picks", "few", "chapters", "per", "sequence"]


def _hf_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def _chat_file(path):
    long_user = "tell me more about routing " * 3
    rows = [[("system", "be brief"), ("user", "what is a chapter of memory"), ("assistant", "a slice of the bank")],
            [("user", long_user), ("assistant", "top k picks a few chapters per sequence")],
            [("user", "what is routing"), ("assistant", "it picks chapters"), ("user", "tell me more"),
             ("assistant", "top k per sequence")]] * 4
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n"
                            for conv in rows))


def assistant_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Independent of the data code: label j counts when it is inside an assistant turn (content or its
    <|end|>), reading each padded sample from its start."""
    role_ids = {3: "system", 4: "user", 5: "assistant"}
    mask = torch.zeros(labels.shape)
    for b in range(labels.shape[0]):
        role = None  # tokens[0] is a role token; labels start at tokens[1]
        for j, tok in enumerate(labels[b].tolist()):
            if tok in role_ids:
                role = role_ids[tok]
            elif role == "assistant":
                mask[b, j] = 1.0
                if tok == 6:  # <|end|> closes the turn
                    role = None
            elif tok == 6:
                role = None
    return mask


def _ift_step(rank, world_size, cfg):
    from moc_megatron.model.gpt import MoCModel
    from moc_megatron.training.data import collate, step_indices

    initial, _, run = train_with_snapshot(cfg)
    model = MoCModel(cfg, run.ctx)
    model.load_state_dict(initial)
    model.eval()
    lm_masked, lm_all = [], []
    with torch.no_grad():
        for idx in step_indices(0, cfg, run.ctx):
            batch = collate([run.train_data[i] for i in idx], "cpu")
            # the first role token of each sample is tokens[0], so start the turn state from there
            labels = torch.cat([batch["tokens"][:, :1], batch["labels"]], dim=1)
            mask = assistant_label_mask(labels)[:, 1:]
            logits = model(batch["tokens"]).logits.float()
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
            lm_masked.append(((ce * mask).sum() / mask.sum()).item())
            lm_all.append(ce.mean().item())
    return run.history[0].lm_loss, sum(lm_masked) / len(lm_masked), sum(lm_all) / len(lm_all)


@pytest.mark.slow
def test_instruction_tuning_loss_covers_assistant_tokens_only(tmp_path):
    _hf_tokenizer(tmp_path / "tok")
    _chat_file(tmp_path / "chat.jsonl")
    cfg = tiny(mock_data=False, chat_data=[str(tmp_path / "chat.jsonl")], chat_pack=False, split="1,0,0",
               tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"), train_iters=1,
               seq_length=32)
    trained, masked, everything = run_ranks(_ift_step, 1, (cfg,), timeout=240)[0]
    assert trained == pytest.approx(masked, rel=1e-5)
    assert abs(masked - everything) > 1e-3  # the mask matters for this data
