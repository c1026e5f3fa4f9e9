"""lm-eval's Hugging Face model class for MoC exports: ``--model moc`` (registered on import).

lm-eval's stock ``hf`` class scores a right-padded batch with ``model(input_ids)``: no attention mask, padding
token 0. With sequence routing (the paper's mode) the router pools over the whole row, padding included,
so a request's log-likelihood depends on what it was batched with. This class passes each batch's
attention mask (valid positions) to the model, which pools over valid positions only (SPEC 1.2), so scores
do not depend on the batch size. Chunk routing is causal: padding after a request cannot move its
scores, and the stock class is safe there. Generation already passes the mask in the stock class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm import tqdm


@register_model("moc")
class MoCLM(HFLM):
    """HFLM whose log-likelihood forwards carry the attention mask; trusts the export's modeling code."""

    def __init__(self, pretrained, trust_remote_code: bool = True, **kwargs):
        super().__init__(pretrained=pretrained, trust_remote_code=trust_remote_code, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"--model moc scores causal language models; {pretrained} loaded as {self.backend}")

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels=None) -> torch.Tensor:
        # inps, attn_mask: (b, s) -> logits (b, s, vocab)
        autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        with torch.no_grad(), autocast:
            return self.model(input_ids=inps, attention_mask=attn_mask, use_cache=False).logits

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's causal scoring (same ordering, batching, truncation and one-token-continuation cache),
        with the attention mask of each right-padded batch passed to the model."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts" if self.logits_cache else None, group_fn=lambda r: r[-2] + r[-1][:-1])
        batch_size, batch_fn = self._batching(len(collator), override_bs)
        results = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=batch_size, batch_fn=batch_fn):
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            ids, mask = self._right_padded(inputs)
            logprobs = F.log_softmax(self._model_call(ids, attn_mask=mask), dim=-1, dtype=self.softmax_dtype)
            for (request_str, ctx, cont), row, row_mask in zip(chunk, logprobs, mask):
                row = row[row_mask.bool()][-len(cont):][None]  # (1, cont, vocab): the positions predicting cont
                for request_str, cont_toks, row in collator.get_cache(req_str=request_str, cxt_toks=ctx,
                                                                      cont_toks=cont, logits=row):
                    target = torch.tensor(cont_toks, dtype=torch.long, device=self.device)[None]  # (1, n)
                    row = row[:, -target.shape[1]:]
                    answer = (float(row.gather(2, target[..., None]).sum()), bool((row.argmax(-1) == target).all()))
                    results.append(answer)
                    if request_str is not None:  # None: windows of loglikelihood_rolling, cached per document
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def _batching(self, n_requests: int, override_bs: int | None):
        """(batch size, batch-size function) as HFLM chooses them, "auto" included."""
        if self.batch_size != "auto":
            return self.batch_size, None
        if override_bs is not None or n_requests == 0:
            return override_bs or 0, None
        self.batch_sizes = {}  # detect afresh for these requests (HFLM does the same)
        return 0, self._batch_scheduler

    def _right_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (b, longest row), padded on the right with token 0 as HFLM pads."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids.to(self.device), mask.to(self.device)
