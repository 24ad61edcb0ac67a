from mha_lightning.data.datamodule import Seq2SeqDataModule, SyntheticDataModule, TextDataModule

__all__ = ["Seq2SeqDataModule", "SyntheticDataModule", "TextDataModule"]
