"""fusedtune.trainer: ``trainer run config.yaml``: LoRA / QLoRA / full / partial fine-tuning."""

__version__ = "0.1.0"
