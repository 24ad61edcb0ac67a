"""mha_lightning: seq2seq transformers with attention heads sharded across devices,
configured with Hydra, with every head's attention entropy logged to W&B."""

__version__ = "0.1.0"
