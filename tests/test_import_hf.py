"""The way back: a Hugging Face model (our export, or Llama) into a training checkpoint at any layout.

Round trip: a random tiny MoC model -> save_hf -> convert_from_hf at a parallel layout -> the
checkpoint merges (training/export.py) to exactly the original weights. A Llama model imported at TP=2
(vocabulary padded) gives the logits transformers computes. Fine-tuning starts from a converted
checkpoint (one step at learning rate 0 keeps every weight) and refuses to "resume" it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moc_megatron.config import load_config
from moc_megatron.hf.convert import config_from_hf, hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def tiny_cfg(**model):
    cfg = load_config(os.path.join(ROOT, "configs/train/moc-tiny.yaml"),
                      model={"num_layers": 2, "vocab_size": 256, **model},
                      memory={"layers": [0, 1], "tokens": 9 * 8, "chapters": 9, "top_k": 2, "bank_sharing": "per_layer"},
                      training={"seed": 7})
    return cfg.validate(1)


def run_tool(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "tools/convert_from_hf.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def merged(path):
    from moc_megatron.training.export import merged_state_dict, resolve_tag

    return merged_state_dict(resolve_tag(str(path), None))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny MoC model (per-layer banks, a shared chapter) exported to Hugging Face."""
    from moc_megatron.hf import save_hf
    from moc_megatron.model.gpt import MoCModel
    from moc_megatron.parallel.state import single_process

    cfg = tiny_cfg()
    model = MoCModel(cfg, single_process())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    out = tmp_path_factory.mktemp("hf") / "moc"
    save_hf(state, cfg.to_dict(), out)
    return out, state


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("memory", [True, False])
def test_config_from_hf_inverts_hf_config(memory):
    cfg = tiny_cfg(rotary_base=5000.0, norm_epsilon=1e-5)
    if not memory:
        cfg.memory.layers = []
    back = config_from_hf(hf_config(cfg.to_dict()).to_dict())
    for key, value in back["model"].items():
        assert value == getattr(cfg.model, key), key
    if memory:
        for key, value in back["memory"].items():
            assert value == getattr(cfg.memory, key), key
        assert set(back["memory"]) >= {"layers", "tokens", "chapters", "shared_chapters", "top_k", "routing_unit"}
    else:
        assert back["memory"] == {"layers": []}


@pytest.mark.parametrize("change, named", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
])
def test_unsupported_llama_features_are_named(change, named):
    from transformers import LlamaConfig

    config = {**LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4).to_dict(),
              **change}
    with pytest.raises(ValueError, match=named):
        config_from_hf(config, "x/config.json")


def test_untied_llama_and_shape_flags_are_refused_before_anything_is_written(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moc_megatron.training.import_hf import main

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    res = run_tool(["--hf-model", str(tmp_path / "llama"), "--save", str(tmp_path / "out")])  # the CLI's exit code
    assert res.returncode == 2, res.stderr
    assert "lm_head.weight differs from model.embed_tokens.weight" in res.stderr
    # the same entry point in this process (a CLI start costs seconds)
    assert main(["--hf-model", str(tmp_path / "llama"), "--save", str(tmp_path / "out"), "--num-layers", "3"]) == 2
    assert "--num-layers 3" in capsys.readouterr().err
    assert main(["--hf-model", str(tmp_path / "nowhere"), "--save", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_config_json_are_named(exported, tmp_path):
    import shutil

    hf_dir = tmp_path / "moc"
    shutil.copytree(exported[0], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    res = run_tool(["--hf-model", str(hf_dir), "--save", str(tmp_path / "out")])
    assert res.returncode == 2 and "the weight set in" in res.stderr and "layers.2." in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Weights at a layout


LAYOUTS = {"single": [], "tp2_ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
           "tp2_pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_checkpoint_merges_to_the_exported_weights(exported, tmp_path, layout):
    hf_dir, state = exported
    res = run_tool(["--hf-model", str(hf_dir), "--save", str(tmp_path / "ckpt"), *LAYOUTS[layout]])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "converted" in res.stdout and "--finetune" in res.stdout
    meta = json.loads((tmp_path / "ckpt" / "iter_0000000" / "moc_checkpoint.json").read_text())
    assert meta["origin"] == str(hf_dir.resolve())
    tp = 2 if layout != "single" else 1
    assert meta["layout"]["tp_size"] == tp and meta["layout"]["pp_size"] == (2 if "pp2" in layout else 1)
    cfg, got = merged(tmp_path / "ckpt")
    assert cfg["memory"]["layers"] == [0, 1] and cfg["memory"]["bank_sharing"] == "per_layer"
    assert set(got) == set(state), set(got) ^ set(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), f"{layout}: {name}"


@pytest.mark.slow
def test_llama_imports_at_tp2_with_the_logits_transformers_computes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from moc_megatron.training.verify import training_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=255, rope_theta=5000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True)
    llama = LlamaForCausalLM(config).eval()
    llama.save_pretrained(tmp_path / "llama")
    res = run_tool(["--hf-model", str(tmp_path / "llama"), "--save", str(tmp_path / "ckpt"),
                    "--tensor-model-parallel-size", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "padded from 255 to 256 rows" in res.stdout
    cfg, state = merged(tmp_path / "ckpt")
    assert cfg["memory"]["layers"] == [] and cfg["model"]["num_query_groups"] == 2
    assert state["embed_tokens.weight"].shape == (256, 64) and not state["embed_tokens.weight"][255].any()
    tokens = torch.randint(0, 255, (2, 24))
    with torch.no_grad():
        want = llama(tokens).logits
        got = training_model(cfg, state)(tokens).logits[..., :255]
    assert (got - want).abs().max().item() < 1e-5


def moc_train(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "moc_megatron.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_finetuning_starts_from_a_converted_checkpoint_and_resuming_it_is_refused(exported, tmp_path):
    hf_dir, state = exported
    ckpt, out = tmp_path / "ckpt", tmp_path / "ift"
    res = run_tool(["--hf-model", str(hf_dir), "--save", str(ckpt), "--expert-model-parallel-size", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    # the recipe's model (moc-tiny) differs from the converted one: model.yaml, given after it, wins
    run = ["--config", "configs/train/moc-tiny.yaml", "--config", str(ckpt / "model.yaml"), "--load", str(ckpt),
           "--mock-data", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2",
           "--train-iters", "1", "--eval-interval", "0", "--save", str(out), "--expert-model-parallel-size", "2",
           "--zero-stage", "1", "--lr-warmup-iters", "0"]
    zero_lr = ["--lr", "0", "--min-lr", "0", "--memory-layer-lr", "0", "--memory-bank-lr", "0"]
    res = moc_train(["--finetune", *zero_lr, *run], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    _, got = merged(out)
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
    res = moc_train(run, nproc=2)
    assert res.returncode != 0 and "start from its weights with --finetune" in res.stderr, res.stderr[-3000:]
