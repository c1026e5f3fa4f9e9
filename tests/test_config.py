import argparse

import pytest

from moc_megatron.config import add_config_args, config_from_args, load_config, load_yaml, parse_config
from moc_megatron.errors import UserError

TINY = "configs/models/moc-tiny.yaml"


def test_yaml_flags_override_yaml(repo_root):
    cfg = parse_config(["--config", f"{repo_root}/{TINY}", "--num-layers", "6", "--hidden-size", "256",
                        "--num-attention-heads", "8", "--num-query-groups", "4", "--ffn-hidden-size", "512",
                        "--seq-length", "64", "--micro-batch-size", "2", "--memory-tokens", "4096",
                        "--memory-chapters", "64", "--memory-shared-chapters", "2", "--memory-top-k", "4",
                        "--memory-layers", "1", "5", "--no-memory-normalize-before-mixing"])
    cfg.validate()
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_query_groups) == (6, 256, 4)
    assert (cfg.memory.tokens, cfg.memory.chapters, cfg.memory.shared_chapters, cfg.memory.top_k) == (4096, 64, 2, 4)
    assert cfg.memory.layers == [1, 5] and cfg.memory.normalize_before_mixing is False
    assert cfg.training.seq_length == 64 and cfg.training.micro_batch_size == 2
    assert cfg.model.rotary_base == 100000.0  # untouched YAML value survives


def test_empty_memory_layers_flag_gives_vanilla(repo_root):
    cfg = parse_config(["--config", f"{repo_root}/{TINY}", "--memory-layers"]).validate()
    assert not cfg.has_memory and cfg.num_banks == 0


def test_include_is_relative_to_the_including_file(repo_root):
    cfg = load_config(f"{repo_root}/configs/models/vanilla-iso-flop.yaml").validate()
    assert cfg.model.num_layers == 24 and cfg.model.hidden_size == 768 and not cfg.has_memory


def test_defaults_resolved_in_one_place():
    cfg = load_config(model=dict(hidden_size=64, num_attention_heads=4), memory=dict(layers=[0]))
    assert cfg.model.num_query_groups == 4 and cfg.model.ffn_hidden_size == 256
    assert cfg.memory.num_heads == 4 and cfg.memory.num_kv_heads == 4
    assert cfg.training.memory_bank_lr == cfg.training.lr and cfg.training.lr_decay_iters == cfg.training.train_iters


BAD = [
    (dict(memory=dict(layers=[1], tokens=8000, chapters=129)), "--memory-tokens=8000", "not divisible"),
    (dict(memory=dict(layers=[1], top_k=129)), "--memory-top-k=129", "routed chapters"),
    (dict(model=dict(num_attention_heads=4, num_query_groups=3)), "--num-attention-heads=4", "--num-query-groups=3"),
    (dict(model=dict(num_query_groups=2), parallel=dict(tensor_model_parallel_size=4)), "--num-query-groups=2",
     "--tensor-model-parallel-size=4"),
    (dict(memory=dict(layers=[0, 9])), "--memory-layers=0 9", "out of range"),
    (dict(model=dict(hidden_size=130)), "--hidden-size=130", "--num-attention-heads"),
    (dict(memory=dict(layers=[1], num_heads=4, num_kv_heads=3)), "--memory-num-heads=4", "--memory-num-kv-heads=3"),
    (dict(memory=dict(layers=[1], pooling="max")), "--memory-pooling=max", "mean, rolling"),
    (dict(training=dict(lr_decay_style="WSD")), "--lr-decay-style=WSD", "--lr-wsd-decay-iters"),
    (dict(memory=dict(layers=[1], routing_unit="chunk", routing_chunk=100)), "--memory-routing-chunk=100",
     "--seq-length=256"),
    (dict(parallel=dict(pipeline_model_parallel_size=2), training=dict(zero_stage=2)), "--zero-stage=2", "pipeline"),
    (dict(memory=dict(layers=[]), parallel=dict(expert_model_parallel_size=2)), "--expert-model-parallel-size=2",
     "memory layers"),
]


@pytest.mark.parametrize("overrides,flag,why", BAD, ids=[b[1] for b in BAD])
def test_validate_names_option_and_value(repo_root, overrides, flag, why):
    cfg = load_config(f"{repo_root}/{TINY}", **overrides)
    with pytest.raises(UserError) as e:
        cfg.validate()
    assert flag in str(e.value) and why in str(e.value)


def test_layout_checks_need_world_size(repo_root):
    cfg = load_config(f"{repo_root}/{TINY}", parallel=dict(tensor_model_parallel_size=2))
    cfg.validate()  # no world size: layout not checked
    with pytest.raises(UserError, match="does not divide the world size 3"):
        cfg.validate(world_size=3)
    cfg = load_config(f"{repo_root}/{TINY}", parallel=dict(expert_model_parallel_size=3))
    with pytest.raises(UserError, match="does not divide the 128 routed chapters"):
        cfg.validate()
    cfg = load_config(f"{repo_root}/{TINY}", parallel=dict(expert_model_parallel_size=2))
    with pytest.raises(UserError, match="data-parallel size 1"):
        cfg.validate(world_size=1)


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'model.num_layer' \(flag --num-layer\)"):
        load_yaml(bad)
    bad.write_text("modle:\n  num_layers: 3\n")
    with pytest.raises(UserError, match="unknown section 'modle'"):
        load_yaml(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_flag_set_is_frozen():
    """Every flag is deliberate: a new one must be added here too."""
    parser = add_config_args(argparse.ArgumentParser())
    flags = sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--") and not o.startswith("--no-"))
    expected = sorted(FLAGS.split())
    assert flags == expected, f"added: {set(flags) - set(expected)}; removed: {set(expected) - set(flags)}"


FLAGS = """
--help --config
--num-layers --hidden-size --num-attention-heads --num-query-groups --ffn-hidden-size --vocab-size
--rotary-base --norm-epsilon --init-method-std --recompute-activations
--memory-layers --memory-tokens --memory-chapters --memory-shared-chapters --memory-top-k --memory-num-heads
--memory-num-kv-heads --memory-routed-scaling-factor --memory-normalize-before-mixing --memory-bank-sharing
--memory-bank-init-std --memory-pooling --memory-rolling-window --memory-routing-unit --memory-routing-chunk
--memory-first-chunk --memory-load-balance-coeff --memory-z-loss-coeff --memory-load-balance-form
--memory-aux-loss-dp-average --memory-recompute-kv
--tensor-model-parallel-size --pipeline-model-parallel-size --expert-model-parallel-size
--seq-length --micro-batch-size --global-batch-size --train-iters --lr --min-lr --lr-warmup-iters
--lr-decay-style --lr-decay-iters --lr-wsd-decay-iters --memory-layer-lr --memory-bank-lr --freeze-memory-bank
--memory-bank-optimizer --weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad --bf16 --seed
--data-path --split --mock-data --eval-interval --eval-iters --save --save-interval --load --keep-last
--finetune --exit-interval --exit-duration-in-mins --exit-signal-handler --exit-signal
--tensorboard-dir --log-interval --log-jsonl --peak-tflops --zero-stage --deepspeed-config
--nan-policy --tokenizer-type --tokenizer-model --chat-data --chat-pack
"""


def test_unset_flags_do_not_override_yaml(repo_root):
    parser = add_config_args(argparse.ArgumentParser())
    cfg = config_from_args(parser.parse_args(["--config", f"{repo_root}/{TINY}"]))
    assert cfg.memory.layers == [1, 3] and cfg.model.hidden_size == 128
