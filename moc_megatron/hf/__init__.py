"""Hugging Face export (SPEC 2.4).

configuration_moc.py and modeling_moc.py are standalone (torch + transformers only): export copies them
into the output directory, where ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads them. convert.py maps training state dicts to HF names and back and writes export directories.
"""

from moc_megatron.hf.configuration_moc import MoCConfig
from moc_megatron.hf.convert import from_hf, hf_config, save_hf, spm_tokenizer, to_hf
from moc_megatron.hf.modeling_moc import MoCCache, MoCForCausalLM, MoCModel

__all__ = ["MoCConfig", "MoCCache", "MoCForCausalLM", "MoCModel", "from_hf", "hf_config", "save_hf",
           "spm_tokenizer", "to_hf"]
