"""Tokenizers, preprocessing into Megatron indexed datasets, and the datasets training reads.

    from moc_megatron.data import build_tokenizer, build_pretraining_datasets, build_mock_datasets
    tokenizer = build_tokenizer("SentencePieceTokenizer", "tok.model")
    train, valid, test = build_pretraining_datasets(["0.7", "a_text_document", "0.3", "b_text_document"],
                                                    "969,30,1", seq_length, (n_train, n_valid, n_test),
                                                    seed, tokenizer)

Every dataset yields ``{"tokens": LongTensor[s], "labels": LongTensor[s], "loss_mask": FloatTensor[s]}``
with labels the tokens shifted by one. Names are imported on first use, so tools that need only the
tokenizer or the corpus builder do not pay for importing megatron-core.
"""

import importlib

_EXPORTS = {
    "Tokenizer": "tokenizer", "build_tokenizer": "tokenizer", "CHAT_TOKENS": "tokenizer",
    "build_pretraining_datasets": "pretraining", "build_mock_datasets": "pretraining",
    "MockDataset": "pretraining", "parse_data_path": "pretraining",
    "build_chat_datasets": "chat", "ChatDataset": "chat", "encode_conversation": "chat",
    "preprocess": "preprocess", "merge_datasets": "indexed", "IndexedDatasetWriter": "indexed",
    "ensure_dataset_helpers": "helpers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
