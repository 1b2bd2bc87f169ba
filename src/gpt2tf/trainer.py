"""Fine-tuning (placeholder)."""


def train_cli(dataset: str, run_name: str = "run1"):
    """Fine-tune GPT-2."""
    raise NotImplementedError
