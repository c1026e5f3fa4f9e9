"""Parameter and FLOPs accounting (SPEC 1.5, 1.6) against the paper's numbers and hand arithmetic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moc_megatron import accounting
from moc_megatron.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "configs" / "models"
TOOL = ROOT / "tools" / "estimate_flops.py"


def paper(**overrides):
    return load_config(MODELS / "moc-paper.yaml", **overrides)


def millions(n: int) -> str:
    return f"{n / 1e6:.2f}"


# ---- parameters -------------------------------------------------------------------------------


def test_moc_paper_parameters_match_the_paper():
    p = accounting.count_parameters(paper())
    assert {k: millions(v) for k, v in p.items()} == {
        "total": "371.29", "backbone": "147.87", "bank": "201.38", "memory_layers": "22.04"}
    assert p == {"total": 371_292_932, "backbone": 147_874_560, "bank": 201_375_744, "memory_layers": 22_042_628}


@pytest.mark.parametrize("name, expected", [("vanilla-iso-flop", "202.94"), ("vanilla-backbone", "147.87")])
def test_vanilla_parameters_match_the_paper(name, expected):
    p = accounting.count_parameters(load_config(MODELS / f"{name}.yaml"))
    assert millions(p["total"]) == expected
    assert p["total"] == p["backbone"] and p["bank"] == p["memory_layers"] == 0


def test_per_layer_banks_multiply_the_bank():
    p = accounting.count_parameters(paper(memory={"bank_sharing": "per_layer"}))
    assert p["bank"] == 4 * 201_375_744


# ---- a tiny config, every term by hand ---------------------------------------------------------
# L 4, d 8, 2 heads of 4 (q width 8), 1 KV group (kv width 4), ffn 16, vocab 10, 2 layers;
# memory at layer 1: 16 tokens = 4 chapters x T 4, 1 shared, top-2 of 3 routed; 2 memory heads, 1 KV head.


def tiny(**memory):
    return load_config(
        model={"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "num_query_groups": 1,
               "ffn_hidden_size": 16, "vocab_size": 10},
        memory={"layers": [1], "tokens": 16, "chapters": 4, "shared_chapters": 1, "top_k": 2,
                "num_heads": 2, "num_kv_heads": 1, **memory},
        training={"seq_length": 4, "micro_batch_size": 2}).validate()


BLOCK = (4 * (4 * 8 + 4)      # attention norm 144
         + 2 * 4 * 8 * 8      # q 512
         + 2 * 2 * 4 * 8 * 4  # k, v 256 each
         + 3 * 4 * (8 + 4)    # RoPE 144
         + 4 * 4 * 4 * 8      # attention matmuls 512
         + 2 * 4 * 4 * 7      # softmax 224
         + 2 * 4 * 8 * 8      # o 512
         + 4 * 8              # residual 32
         + 4 * (4 * 8 + 4)    # MLP norm 144
         + 3 * 2 * 4 * 8 * 16  # w1, w3, w2 1024 each
         + 5 * 4 * 16         # SwiGLU 320
         + 4 * 8)             # residual 32
HEAD = 4 * 36 + 2 * 4 * 8 * 10 + 3 * 10 * 5   # norm 144, LM head 640, cross-entropy 150
KV_SPEC = 12 * 36 + 2 * (2 * 12 * 8 * 4)      # N_sel 12: preprocessing norm 432, K and V 768 each
MEMORY_SEQUENCE = (8 * 3 + 8              # pooling 32
                   + 2 * 8 * 4            # router linear 64
                   + 5 * 4                # router softmax 20
                   + 4 * 1                # top-k: C ceil(log2 2) 4
                   + 2 * 3 + 2 * 3 + 1    # load balance 13
                   + 2 * 4 + 3            # z-loss 11
                   + 4 * 36               # memory norm 144
                   + 12 * 8               # weighting 96
                   + 2 * 4 * 8 * 8        # memory q 512
                   + 4 * 4 * 12 * 8       # matmuls over 12 keys 1536
                   + 2 * 4 * 12 * 7       # softmax 672
                   + 2 * 4 * 8 * 8        # memory o 512
                   + 4 * 8                # residual 32
                   + KV_SPEC)


def test_tiny_forward_flops_match_hand_count():
    assert BLOCK == 6160 and MEMORY_SEQUENCE == 5616 and HEAD == 934
    report = accounting.estimate_flops(tiny())
    assert report.forward_flops == 2 * BLOCK + MEMORY_SEQUENCE + HEAD == 18870
    assert report.backward_flops == 2 * 18870 and report.total_flops == 3 * 18870


def test_tiny_parameters_match_hand_count():
    backbone = 10 * 8 + 2 * (2 * 8 + 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16) + 8
    memory_layer = 8 + 4 * 8 + 4 + 8 * 8 + 2 * 8 * 4 + 8 * 8
    assert accounting.count_parameters(tiny()) == {
        "total": backbone + 16 * 8 + memory_layer, "backbone": backbone, "bank": 128, "memory_layers": memory_layer}


def test_tiny_terms_are_listed_by_name():
    report = accounting.estimate_flops(tiny())
    assert report.term("memory.k_proj").flops == 768 and report.term("memory.k_proj").count == 1
    assert report.term("block.attn.softmax").each == 224 and report.term("block.attn.softmax").count == 2
    assert report.term("head.cross_entropy").flops == 150
    assert sum(f for _, f in report.items()) == report.forward_flops


def test_chunk_routing_counts_router_and_kv_per_chunk():
    # chunks of 2: chunk 0 routes on its first token, chunk 1 on positions 0-1; each reads 12 keys
    memory = (8 * 1 + 8 * 2                 # pooling over 1 and 2 positions
              + 2 * (2 * 8 * 4 + 5 * 4 + 4 + 2 * 4 + 3)   # router linear, softmax, top-k, z-loss per chunk
              + 2 * (2 * 3) + 2 * 3 + 1     # load balance
              + 4 * 36 + 2 * 4 * 8 * 8 * 2 + 4 * 8   # memory norm, q and o, residual
              + 2 * 12 * 8                  # weighting per chunk
              + 2 * (4 * 2 * 12 * 8) + 2 * (2 * 2 * 12 * 7)  # matmuls and softmax per chunk
              + 2 * KV_SPEC)                # each chunk normalises and projects its own 12 tokens
    report = accounting.estimate_flops(tiny(routing_unit="chunk", routing_chunk=2))
    assert report.forward_flops == 2 * BLOCK + memory + HEAD == 21031


def test_chunk_routing_shared_only_first_chunk_reads_shared_chapters():
    # chunk 0: no router, 4 shared keys; chunk 1: router over 2 positions, 12 keys
    memory = (8 * 2 + 2 * 8 * 4 + 5 * 4 + 4 + (2 * 3 + 2 * 3 + 1) + (2 * 4 + 3)
              + 4 * 36 + 2 * 4 * 8 * 8 * 2 + 4 * 8
              + (4 + 12) * 8 + (4 + 12) * 36 + 2 * (2 * 16 * 8 * 4)
              + 4 * 2 * 4 * 8 + 4 * 2 * 12 * 8 + 2 * 2 * 4 * 7 + 2 * 2 * 12 * 7)
    report = accounting.estimate_flops(tiny(routing_unit="chunk", routing_chunk=2, first_chunk="shared_only"))
    assert report.forward_flops == 2 * BLOCK + memory + HEAD == 18806


# ---- implemented (unique-chapter) count ---------------------------------------------------------


def test_implemented_projects_expected_unique_chapters_once_per_micro_batch():
    unique = 1 + 3 * (1 - (1 - 2 / 3) ** 2)   # two sequences, top-2 of 3 routed, 1 shared
    tokens_per_sequence = unique * 4 / 2
    expected = 18870 - KV_SPEC + tokens_per_sequence * 36 + 2 * (2 * tokens_per_sequence * 8 * 4)
    assert accounting.expected_unique_chapters(tiny(), 2) == pytest.approx(unique)
    assert accounting.implemented_forward_flops(tiny(), micro_batch_size=2) == pytest.approx(expected)


def test_implemented_worst_case_caps_at_the_bank():
    assert accounting.worst_case_unique_chapters(tiny(), 2) == 3 + 1   # min(3 routed, 2 x 2) + shared
    worst = accounting.implemented_forward_flops(tiny(), micro_batch_size=2, worst_case=True)
    assert worst == pytest.approx(18870 - KV_SPEC + 8 * 36 + 2 * (2 * 8 * 8 * 4))


def test_implemented_equals_spec_for_one_sequence_routed_once():
    cfg = tiny()
    assert accounting.implemented_forward_flops(cfg, micro_batch_size=1) == pytest.approx(
        accounting.estimate_flops(cfg).forward_flops)


def test_implemented_is_below_spec_for_moc_paper_at_batch_8():
    cfg = paper()
    spec = accounting.estimate_flops(cfg).forward_flops
    assert accounting.implemented_forward_flops(cfg, micro_batch_size=8) < spec
    assert accounting.implemented_forward_flops(cfg, micro_batch_size=8, worst_case=True) < spec


def test_implemented_shares_chapters_across_chunks_of_one_sequence():
    cfg = tiny(routing_unit="chunk", routing_chunk=2)
    assert accounting.implemented_forward_flops(cfg, micro_batch_size=1) < accounting.estimate_flops(cfg).forward_flops


# ---- iso-FLOP depth ---------------------------------------------------------------------------


def test_matched_vanilla_layers_tiny_by_hand():
    # vanilla n layers: 6160 n + 934; MoC: 18870 -> n = 2.91 -> 3
    assert accounting.matched_vanilla_layers(tiny(), 4) == 3


def test_vanilla_config_matches_its_own_depth():
    assert accounting.matched_vanilla_layers(load_config(MODELS / "vanilla-iso-flop.yaml")) == 24


# ---- the CLI ----------------------------------------------------------------------------------


def run_tool(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_cli_json_reports_params_terms_and_totals(tmp_path):
    out = run_tool("--config", str(MODELS / "moc-paper.yaml"), "--micro-batch-size", "8", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["params"] == accounting.count_parameters(paper())
    assert s["forward_flops"] == sum(t["flops"] for t in s["terms"]) == accounting.estimate_flops(paper()).forward_flops
    assert s["backward_flops"] == 2 * s["forward_flops"] and s["total_flops"] == 3 * s["forward_flops"]
    assert s["implemented_forward_flops"] < s["forward_flops"]
    assert {t["name"] for t in s["terms"]} >= {"memory.router.top_k", "memory.k_proj", "head.cross_entropy"}


def test_cli_seq_length_overrides_config():
    s = json.loads(run_tool("--config", str(MODELS / "moc-tiny.yaml"), "--seq-length", "4", "--json").stdout)
    assert s["seq_length"] == 4
    assert s["forward_flops"] == accounting.estimate_flops(load_config(MODELS / "moc-tiny.yaml"), 4).forward_flops


def test_cli_table_prints_paper_parameters():
    out = run_tool("--config", str(MODELS / "moc-paper.yaml"))
    assert out.returncode == 0, out.stderr
    assert "371.29M" in out.stdout and "371,292,932" in out.stdout and "memory.attn.softmax" in out.stdout


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {MODELS / 'moc-tiny.yaml'}\nmemory:\n  tokens: 1000\n")
    out = run_tool("--config", str(bad), "--json")
    assert out.returncode == 2
    assert "--memory-tokens=1000" in out.stderr and "Traceback" not in out.stderr and out.stdout == ""
