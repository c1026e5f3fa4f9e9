"""Configuration of Mixture-of-Chapters (MoC) language models for Hugging Face transformers.

Standalone (torch + transformers only): export copies this file next to config.json and
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` loads it. Backbone fields carry Llama's names;
memory fields (SPEC 1.1-1.4) carry moc-megatron's ``memory.*`` names with a ``memory_`` prefix.
"""

from transformers import PretrainedConfig

_CHOICES = {
    "memory_bank_sharing": ("global", "per_layer"),
    "memory_pooling": ("mean", "rolling"),
    "memory_routing_unit": ("sequence", "chunk"),
    "memory_first_chunk": ("first_token", "shared_only"),
    "memory_load_balance_form": ("normalized", "authors"),
    "inference_routing": ("prefill", "rolling"),
}


class MoCConfig(PretrainedConfig):
    """A decoder-only MoC transformer; ``memory_layers=[]`` gives the plain backbone.

    ``inference_routing`` applies to cached decoding with ``memory_routing_unit="sequence"``: "prefill"
    routes on the prompt and keeps those chapters while decoding; "rolling" re-routes every decoding step
    on the mean of the last ``memory_rolling_window`` states. Chunk routing always re-routes at chunk
    boundaries exactly as in training.
    """

    model_type = "moc"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        rms_norm_eps=1e-6,
        rope_theta=100000.0,
        max_position_embeddings=2048,
        initializer_range=0.02,
        memory_layers=(),
        memory_chapters=128,
        memory_chapter_tokens=64,
        memory_shared_chapters=1,
        memory_top_k=8,
        memory_num_heads=None,
        memory_num_kv_heads=None,
        memory_routed_scaling_factor=2.5,
        memory_normalize_before_mixing=True,
        memory_bank_sharing="global",
        memory_bank_init_std=0.02,
        memory_pooling="mean",
        memory_rolling_window=64,
        memory_routing_unit="sequence",
        memory_routing_chunk=128,
        memory_first_chunk="first_token",
        memory_load_balance_coeff=0.01,
        memory_z_loss_coeff=0.001,
        memory_load_balance_form="normalized",
        inference_routing="prefill",
        use_cache=True,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.memory_layers = sorted(int(i) for i in memory_layers)
        self.memory_chapters = memory_chapters
        self.memory_chapter_tokens = memory_chapter_tokens
        self.memory_shared_chapters = memory_shared_chapters
        self.memory_top_k = memory_top_k
        self.memory_num_heads = memory_num_heads or num_attention_heads
        self.memory_num_kv_heads = memory_num_kv_heads or self.memory_num_heads
        self.memory_routed_scaling_factor = memory_routed_scaling_factor
        self.memory_normalize_before_mixing = memory_normalize_before_mixing
        self.memory_bank_sharing = memory_bank_sharing
        self.memory_bank_init_std = memory_bank_init_std
        self.memory_pooling = memory_pooling
        self.memory_rolling_window = memory_rolling_window
        self.memory_routing_unit = memory_routing_unit
        self.memory_routing_chunk = memory_routing_chunk
        self.memory_first_chunk = memory_first_chunk
        self.memory_load_balance_coeff = memory_load_balance_coeff
        self.memory_z_loss_coeff = memory_z_loss_coeff
        self.memory_load_balance_form = memory_load_balance_form
        self.inference_routing = inference_routing
        self.use_cache = use_cache
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"MoCConfig.{name}={getattr(self, name)!r}: must be one of {', '.join(choices)}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_banks(self) -> int:
        if not self.memory_layers:
            return 0
        return 1 if self.memory_bank_sharing == "global" else len(self.memory_layers)

    def bank_index(self, layer_idx: int) -> int:
        """Which bank memory layer ``layer_idx`` reads."""
        return 0 if self.memory_bank_sharing == "global" else self.memory_layers.index(layer_idx)
