"""DataModules: synthetic tasks and parallel text, sharing one batching path."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from mha_lightning.data.batching import BucketBatchSampler, Example, PairDataset, ResumableDataLoader, collate
from mha_lightning.data.vocab import EOS_ID, NUM_SPECIAL, PAD_ID
from mha_lightning.errors import ConfigError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class Seq2SeqDataModule(L.LightningDataModule):
    """Subclasses fill ``self.splits`` in ``setup`` and say how to turn ids into text."""

    is_text = False

    def __init__(
        self,
        batch_size: int | None = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        probe_size: int = 32,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size is None and max_tokens is None:
            raise ConfigError(
                "set data.batch_size (sentences per batch), data.max_tokens (padded tokens per batch) or both; "
                "both are null"
            )
        for key, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{key} must be a positive integer (or null), got {value!r}")
        self.batch_size = batch_size
        self.max_tokens = max_tokens  # per replica; with batch_size, both limits hold
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.probe_size = probe_size
        self.splits: dict[str, list[Example]] = {}

    @property
    def vocab_size(self) -> int:
        """Token ids are in ``[0, vocab_size)``, the 4 special ids included."""
        raise NotImplementedError

    def check_inputs(self) -> None:
        """Cheap checks (files exist) run by every rank before training, so all stop alike."""

    def read_inputs(self, tokenizer: str | Path | None = None) -> None:
        """Everything about the data that can fail, done by the launching process before the run writes anything
        (docs/design.md, "Run folders"). Synthetic data is generated (and checked) when built: nothing to do."""

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids (stopping at EOS) -> the text that BLEU/chrF and hypothesis files see."""
        ids = strip_ids(ids)
        return " ".join(str(i) for i in ids)

    def alignment(self, src: Sequence[int]) -> list[int] | None:
        """The source position each target token copies, where the task defines one (synthetic tasks);
        None for translation."""
        return None

    def _check_max_tokens(self, max_len: int) -> None:
        """A batch of ``max_tokens`` must hold the longest sentence allowed (``max_len`` + EOS/BOS)."""
        if self.max_tokens is not None and self.max_tokens < max_len + 1:
            raise ConfigError(
                f"data.max_tokens ({self.max_tokens}) is smaller than the longest allowed sentence, data.max_len "
                f"({max_len}) + 1 (EOS/BOS) = {max_len + 1} tokens; raise data.max_tokens or lower data.max_len"
            )

    def _sampler_kwargs(self) -> dict:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        return kwargs or {"num_replicas": 1, "rank": 0}

    def _loader(self, split: str, train: bool) -> ResumableDataLoader:
        pairs = self.splits[split]
        batch_size = self.batch_size if train else self.eval_batch_size
        # Token batches for training, and for evaluation unless data.eval_batch_size says how many sentences.
        by_tokens = self.max_tokens is not None and (train or batch_size is None)
        sampler = BucketBatchSampler(
            [len(s) + len(t) for s, t in pairs],
            batch_size=batch_size,
            shuffle=train,
            seed=self.seed,
            drop_last=train,
            max_tokens=self.max_tokens if by_tokens else None,
            sizes=[max(len(s), len(t)) + 1 for s, t in pairs],  # EOS on the source, BOS/EOS on the target
            **self._sampler_kwargs(),
        )
        if train and by_tokens:
            padded = sampler.padded_tokens()
            log.info(
                "token batches (data.max_tokens=%d per replica): %d batches per epoch per replica, padded tokens "
                "per batch mean %.0f, max %d",
                self.max_tokens,
                len(padded),
                sum(padded) / len(padded),
                max(padded),
            )
        return ResumableDataLoader(
            PairDataset(pairs),
            sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self):
        return self._loader("train", train=True)

    @override
    def val_dataloader(self):
        return self._loader("val", train=False)

    @override
    def test_dataloader(self):
        return self._loader("test", train=False)

    def probe_batch(self) -> dict[str, torch.Tensor]:
        """A fixed set of validation examples: the same every time, so entropy curves compare."""
        return collate(self.splits["val"][: self.probe_size])


def strip_ids(ids: Sequence[int]) -> list[int]:
    """Ids up to the first EOS, special ids (PAD, BOS, UNK) dropped."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i >= NUM_SPECIAL:
            out.append(i)
    return out


class SyntheticDataModule(Seq2SeqDataModule):
    """A synthetic task (``mha_lightning.data.synthetic``): all splits generated, seeded, when built."""

    def __init__(
        self,
        task: str = "reverse",
        vocab_size: int = 24,
        min_len: int = 4,
        max_len: int = 12,
        num_train: int = 20000,
        num_val: int = 500,
        num_test: int = 500,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._check_max_tokens(max_len)
        from mha_lightning.data.synthetic import generate

        self.task = task
        self._vocab_size = vocab_size
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        # Validate now (before any process is spawned); generation itself is cheap.
        self.splits = {
            split: generate(task, n, vocab_size, min_len, max_len, seed=self.seed * 1000 + k)
            for k, (split, n) in enumerate(sizes.items())
        }

    @property
    @override
    def vocab_size(self) -> int:
        return self._vocab_size

    @override
    def alignment(self, src: Sequence[int]) -> list[int] | None:
        from mha_lightning.data.synthetic import ALIGNMENTS

        return ALIGNMENTS[self.task](list(src))


class TextDataModule(Seq2SeqDataModule):
    """Parallel text: per split two aligned files (``src``, ``tgt``) or one ``tsv`` file.

    A BPE tokenizer is trained on the training split once, saved to ``tokenizer_path``
    and reused by evaluation and resume."""

    is_text = True

    def __init__(
        self,
        train: dict,
        val: dict,
        test: dict | None = None,
        tokenizer_path: str = "tokenizer.json",
        vocab_size: int = 8000,
        min_len: int = 1,
        max_len: int = 100,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 0:
            raise ConfigError(f"data.min_len must be an integer >= 0 (tokens), got {min_len!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < max(1, min_len):
            raise ConfigError(
                f"data.max_len must be an integer >= max(1, data.min_len={min_len}) (tokens per sentence), "
                f"got {max_len!r}"
            )
        self._check_max_tokens(max_len)
        has_test = test is not None and any(v is not None for v in test.values())
        self.files = {"train": dict(train), "val": dict(val), "test": dict(test) if has_test else None}
        self.tokenizer_path = Path(tokenizer_path)
        self._vocab_size = vocab_size
        self.min_len, self.max_len = min_len, max_len
        self.tokenizer = None
        self._unsaved = False  # read_inputs trained the tokenizer: prepare_data saves it

    @property
    @override
    def vocab_size(self) -> int:
        return self._vocab_size

    @override
    def check_inputs(self) -> None:
        from mha_lightning.data.text import check_parallel_files

        for split, files in self.files.items():
            if files is not None:
                check_parallel_files(**files, split=split)

    def _read(self, split: str) -> list[tuple[str, str]]:
        from mha_lightning.data.text import read_parallel_text

        return read_parallel_text(**self.files[split], split=split)

    @override
    def read_inputs(self, tokenizer: str | Path | None = None) -> None:
        """Read every split, load ``tokenizer`` (or train one in memory, saved by ``prepare_data`` once the run
        owns its folder) and encode and length-filter the splits: a bad file, a broken tokenizer or a training split
        the filter empties stops here in one line, before anything is written."""
        from mha_lightning.data.tokenizer import BPETokenizer

        texts = {split: self._read(split) for split, files in self.files.items() if files is not None}
        if tokenizer is not None:
            self._use_tokenizer(BPETokenizer.load(tokenizer), tokenizer)
        else:
            trained = BPETokenizer.train([t for pair in texts["train"] for t in pair], self._vocab_size)
            self._use_tokenizer(trained, self.tokenizer_path)
            self._unsaved = True
        self._encode_splits(list(SPLITS), texts)

    @override
    def prepare_data(self) -> None:
        """Save the tokenizer ``read_inputs`` trained, or train and save one, unless ``tokenizer_path`` exists
        (once, before ``setup``)."""
        from mha_lightning.data.tokenizer import load_or_train_tokenizer

        if self.tokenizer_path.exists():
            return
        if self._unsaved:
            self.tokenizer.save(self.tokenizer_path)
            log.info("saved tokenizer to %s", self.tokenizer_path)
            self._unsaved = False
            return
        pairs = self._read("train")
        texts = [t for pair in pairs for t in pair]
        load_or_train_tokenizer(self.tokenizer_path, texts, self._vocab_size)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer and encode the splits ``stage`` needs (evaluation: val and test only)."""
        from mha_lightning.data.tokenizer import BPETokenizer

        if self.tokenizer is None:
            if not self.tokenizer_path.exists():
                self.prepare_data()
            self._use_tokenizer(BPETokenizer.load(self.tokenizer_path), self.tokenizer_path)
        # Evaluation (mha-eval, trainer.test) needs neither the training files nor their encoding.
        self._encode_splits(["val", "test"] if stage in ("validate", "test", "predict") else list(SPLITS))

    def _use_tokenizer(self, tokenizer, path: str | Path) -> None:
        if tokenizer.vocab_size > self._vocab_size:
            raise ConfigError(
                f"tokenizer {path} has {tokenizer.vocab_size} tokens but data.vocab_size "
                f"is {self._vocab_size}; raise data.vocab_size or delete the tokenizer file to retrain it"
            )
        self.tokenizer = tokenizer

    def _encode_splits(self, wanted: list[str], texts: dict[str, list[tuple[str, str]]] | None = None) -> None:
        """Encode the ``wanted`` splits not encoded yet (from ``texts`` where given, else read from their files)."""
        from mha_lightning.data.text import check_kept, filter_by_length

        for split in wanted:
            if split in self.splits or self.files[split] is None:
                continue
            pairs = texts[split] if texts is not None else self._read(split)
            encoded = list(
                zip(
                    self.tokenizer.encode_batch([s for s, _ in pairs]),
                    self.tokenizer.encode_batch([t for _, t in pairs]),
                    strict=True,
                )
            )
            # Evaluation keeps every sentence (truncated to the model's reach); training filters.
            # Targets too: the teacher-forced val/test loss feeds BOS + target to the decoder.
            if split == "train":
                total = len(encoded)
                encoded, _ = filter_by_length(encoded, self.min_len, self.max_len, name="data.train")
                where = " / ".join(str(v) for v in self.files["train"].values() if v is not None)
                check_kept(encoded, total, where, self.min_len, self.max_len)
            else:
                cut = sum(len(s) > self.max_len or len(t) > self.max_len for s, t in encoded)
                if cut:
                    log.warning(
                        "%d of %d %s pairs are longer than data.max_len (%d tokens) and are scored truncated; "
                        "raise data.max_len (and model.max_len) to score them whole",
                        cut,
                        len(encoded),
                        split,
                        self.max_len,
                    )
                encoded = [(s[: self.max_len], t[: self.max_len]) for s, t in encoded]
            self.splits[split] = encoded
        if self.files["test"] is None:
            self.splits["test"] = self.splits["val"]

    @override
    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(strip_ids(ids))


__all__ = ["Seq2SeqDataModule", "SyntheticDataModule", "TextDataModule", "PAD_ID"]
