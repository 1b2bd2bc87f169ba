"""Conversion between OpenAI-layout model directories and HuggingFace GPT-2 directories (placeholder)."""


def to_hf_cli(src_dir: str, out_dir: str):
    """Write a HuggingFace GPT-2 directory (model.safetensors, config.json, tokenizer files)."""
    raise NotImplementedError


def from_hf_cli(hf_dir: str, out_dir: str):
    """Turn a HuggingFace GPT-2 directory into a model directory in OpenAI's layout."""
    raise NotImplementedError
