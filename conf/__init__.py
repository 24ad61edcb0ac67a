"""The Hydra configs of ``mha-train`` (``conf/*.yaml``), shipped as the package ``mha_lightning.conf``."""
