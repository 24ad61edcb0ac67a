"""Data: synthetic tasks and parallel text, tokenized, length-bucketed and resumable."""

from mha_lightning.data.datamodule import Seq2SeqDataModule, SyntheticDataModule, TextDataModule

__all__ = ["Seq2SeqDataModule", "SyntheticDataModule", "TextDataModule"]
