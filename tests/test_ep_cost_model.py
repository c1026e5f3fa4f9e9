"""benchmarks/ep_cost_model.py: the chapter-parallel communication model against enumeration, simulation
and the bytes a real EP=2 / EP=4 gloo training logs."""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import ep_cost_model as ecm  # noqa: E402


@pytest.mark.parametrize("ep", [2, 4])
def test_p_miss_equals_enumeration(ep):
    routed = 8
    owner0 = set(range(routed // ep))
    for k in range(routed + 1):
        subsets = list(itertools.combinations(range(routed), k))
        missed = sum(1 for s in subsets if not owner0 & set(s)) / len(subsets)
        assert ecm.p_owner_missed(routed, ep, k) == pytest.approx(missed, abs=1e-12), (ep, k)


@pytest.mark.parametrize("routed, ep, k", [(4096, 8, 64), (4096, 64, 64), (128, 4, 8), (16, 4, 3)])
def test_pairs_per_unit_matches_simulation(routed, ep, k):
    g = torch.Generator().manual_seed(0)
    n = 4000
    picks = torch.rand(n, routed, generator=g).topk(k, dim=1).indices        # uniform k-subsets
    owners = torch.zeros(n, ep).scatter_(1, picks // (routed // ep), 1.0)
    pairs = owners.sum(1)
    want = ecm.expected_pairs_per_unit(routed, ep, k)
    assert abs(pairs.mean().item() - want) <= 4 * pairs.std().item() / math.sqrt(n) + 1e-9


@pytest.mark.parametrize("routed, k, units", [(4096, 64, 16), (128, 8, 8), (16, 3, 4)])
def test_expected_distinct_matches_simulation(routed, k, units):
    g = torch.Generator().manual_seed(1)
    trials = 400
    picks = torch.rand(trials, units, routed, generator=g).topk(k, dim=2).indices
    hit = torch.zeros(trials, routed).scatter_(1, picks.reshape(trials, -1), 1.0)
    distinct = hit.sum(1)
    want = ecm.expected_distinct(routed, k, units)
    assert abs(distinct.mean().item() - want) <= 4 * distinct.std().item() / math.sqrt(trials) + 1e-9


def test_row_sizes_match_the_hand_count_of_dispatch():
    """EP=2, 2 sequences of 32 queries, 4 heads x 32 dims fp32, top-k 13: every unit hits both owners."""
    case = ecm.EPCase(ep=2, micro_batch=2, seq=32, routing_unit="sequence", chunk=8, heads=4, kv_heads=4,
                      head_dim=32, hidden=128, chapters=17, shared=1, chapter_tokens=4, top_k=13, dtype_bytes=4)
    rows = ecm.row_bytes(case)
    assert rows["request"] == 32 * 4 * 32 * 4 + 13 * 4 + 13 * 8
    assert rows["reply"] == 32 * 4 * 32 * 4 + 32 * 4 * 4
    out = ecm.bytes_per_layer(case)
    assert out["pairs_send"] == out["pairs_recv"] == 4 and out["pairs_self"] == 2
    assert out["logged"]["sent"] == out["logged"]["received"] == 2 * 2 * 8 + 4 * (rows["request"] + rows["reply"])
    assert out["network"]["forward"] == 16 + 2 * (rows["request"] + rows["reply"])
    assert out["network"]["backward"] == 2 * (rows["reply_grad"] + rows["request_grad"])
    observed = ecm.bytes_per_layer(case, pairs=(3, 1))
    assert observed["logged"]["sent"] == 32 + 3 * rows["request"] + 1 * rows["reply"]
    assert observed["logged"]["received"] == 32 + 1 * rows["request"] + 3 * rows["reply"]


def test_paper_case_and_table():
    seq = ecm.paper_case(routing_unit="sequence")
    assert (seq.hidden, seq.heads, seq.kv_heads, seq.head_dim, seq.chapters, seq.chapter_tokens, seq.top_k,
            seq.seq, seq.dtype_bytes, seq.memory_layers) == (768, 12, 12, 64, 4097, 64, 64, 1024, 2, 4)
    chunk = ecm.paper_case(routing_unit="chunk", chunk=128)
    assert chunk.units_per_seq == 8 and chunk.span == 128
    links = dict(gpus_per_node=8, nvlink_gbs=450.0, ib_gbs=50.0)
    for case in (seq, chunk):
        rows = ecm.table_rows(case, [2, 4, 8, 16, 32, 64], [1, 2, 4, 8, 16], links)
        for r in rows:
            assert 0 < r["pairs_per_unit"] <= r["ep"]
            assert r["dispatch_network"]["total"] < r["dispatch_with_self"]["total"]
        for ep in (2, 8, 64):
            by_b = [r for r in rows if r["ep"] == ep]
            totals = [r["dispatch_network"]["total"] for r in by_b]
            assert totals == sorted(totals)                                      # grows with the micro-batch
            kv = [r["ship_kv"]["total"] for r in by_b]
            assert all(b / a < 2 for a, b in zip(kv, kv[1:]))                    # K/V dedups: sublinear
    # dispatch moves the same queries per sequence whatever the chunking, up to the ids / weights
    s = ecm.bytes_per_layer(replace(seq, ep=8))["network"]["total"]
    c = ecm.bytes_per_layer(replace(chunk, ep=8))["network"]["total"]
    assert c == pytest.approx(s, rel=0.01)


def test_forced_check_cases_are_exact():
    from moc_megatron.config import parse_config

    for name, spec in ecm.CHECK_CASES.items():
        cfg = parse_config(ecm.BASE_FLAGS + spec["flags"]).validate(spec["world"])
        case = ecm.EPCase.from_config(cfg, world_size=spec["world"])
        assert case.ep == spec["world"] and case.dtype_bytes == 4
        if spec["mode"] == "forced":
            assert ecm.p_owner_missed(case.routed, case.ep, case.top_k) == 0.0, name


def _check(name):
    res = ecm.check_case(name, timeout=300)
    print(ecm.check_summary(res))
    assert res["passed"], ecm.check_summary(res)
    assert res["max_error_pct"] == 0.0  # the model is the code's byte count, not an approximation of it
    case_pairs = res["memory_layers"] * res["accumulation"] * res["active_units"] * res["ep"]
    for step in res["steps"]:
        for r in step["ranks"]:
            assert r["pairs_send"] == r["pairs_recv"] == case_pairs
            assert r["logged_sent"] == r["predicted_sent"] == res["expected_step_sent"]
    return res


@pytest.mark.slow
def test_ep2_training_logs_the_predicted_bytes():
    res = _check("ep2_sequence_forced")
    assert res["accumulation"] == 2 and len(res["steps"]) == 2


@pytest.mark.slow
def test_ep4_training_logs_the_predicted_bytes():
    res = _check("ep4_chunk_forced")
    assert res["routing"] == "chunk" and res["units_per_micro_batch"] == 4
