"""A joint source/target byte-level BPE tokenizer stored as one JSON file.

Wraps a Hugging Face :class:`tokenizers.Tokenizer` with a BPE model and the ByteLevel
pre-tokenizer/decoder (as in GPT-2/RoBERTa). Byte-level BPE was chosen over Metaspace
because ``decode(encode(s)) == s`` holds exactly for any UTF-8 text (whitespace runs,
punctuation, accents, unseen scripts): with the full 256-byte alphabet nothing ever maps
to ``<unk>``, which keeps detokenised hypotheses faithful for BLEU scoring.

The special tokens are exactly :data:`~mha_lightning.data.vocab.SPECIAL_TOKENS` at ids
0..3 (PAD, BOS, EOS, UNK). ``encode`` adds no BOS/EOS; the caller does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mha_lightning.atomic import atomic_path
from mha_lightning.data.vocab import EOS_ID, NUM_SPECIAL, SPECIAL_TOKENS, UNK_ID
from mha_lightning.errors import ConfigError, DataError

__all__ = ["BPETokenizer", "load_or_train_tokenizer", "MIN_FULL_BYTE_VOCAB"]

log = logging.getLogger(__name__)

#: Smallest vocab_size that holds the special tokens plus all 256 byte symbols. Below this
#: the alphabet is limited to the most frequent characters of the training text and
#: unseen characters encode to ``<unk>`` (dropped by ``decode``).
MIN_FULL_BYTE_VOCAB = NUM_SPECIAL + 256


def _check_specials(tok: Tokenizer, where: str) -> None:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(NUM_SPECIAL)):
        raise DataError(
            f"tokenizer {where} has special tokens {list(SPECIAL_TOKENS)} at ids {ids}, "
            f"expected ids {list(range(NUM_SPECIAL))}; retrain the tokenizer "
            f"(delete the file) or point data.tokenizer_path at a valid file"
        )


class BPETokenizer:
    """Joint byte-level BPE vocabulary for source and target text."""

    def __init__(self, tokenizer: Tokenizer):
        _check_specials(tokenizer, "(in memory)")
        self._tok = tokenizer

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _new_tokenizer() -> Tokenizer:
        tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
        # add_prefix_space: a word is tokenised the same at the start of a sentence as in
        # the middle; decode() removes the added leading space again.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Train one joint vocabulary of at most ``vocab_size`` entries on ``texts``.

        ``texts`` is consumed once (it may be a generator); pass source and target
        sentences together. The actual size (``.vocab_size``) can be smaller when the
        corpus has too few merges with ``min_frequency`` occurrences.
        """
        vocab_size = int(vocab_size)
        if vocab_size <= NUM_SPECIAL:
            raise ConfigError(
                f"tokenizer vocab_size must be larger than the {NUM_SPECIAL} special tokens, "
                f"got {vocab_size}; set a larger vocab size (>= {MIN_FULL_BYTE_VOCAB} "
                f"recommended)"
            )
        if min_frequency < 1:
            raise ConfigError(f"tokenizer min_frequency must be >= 1, got {min_frequency}; fix the setting")
        kwargs: dict = {}
        if vocab_size >= MIN_FULL_BYTE_VOCAB:
            kwargs["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
        else:
            kwargs["limit_alphabet"] = vocab_size - NUM_SPECIAL
            log.warning(
                "tokenizer vocab_size=%d < %d: the byte alphabet is limited to the %d most "
                "frequent symbols, so rarer characters will encode to %s",
                vocab_size,
                MIN_FULL_BYTE_VOCAB,
                vocab_size - NUM_SPECIAL,
                SPECIAL_TOKENS[UNK_ID],
            )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
            **kwargs,
        )
        counter = {"n": 0}

        def nonempty() -> Iterator[str]:
            for t in texts:
                if t:
                    counter["n"] += 1
                    yield t

        tok = cls._new_tokenizer()
        tok.train_from_iterator(nonempty(), trainer=trainer)
        if counter["n"] == 0:
            raise DataError(
                "cannot train the tokenizer: no non-empty training text was given; "
                "check the data.train paths in your config"
            )
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        assert ids == list(range(NUM_SPECIAL)), f"special token ids {ids} are not 0..3"
        size = tok.get_vocab_size(with_added_tokens=True)
        assert size <= vocab_size, f"trained vocab {size} exceeds requested {vocab_size}"
        log.info(
            "trained BPE tokenizer on %d text(s): vocab size %d (requested %d)",
            counter["n"],
            size,
            vocab_size,
        )
        return cls(tok)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the tokenizer to one JSON file (atomically; parent dirs are created)."""
        with atomic_path(path) as tmp:
            self._tok.save(str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Load a tokenizer JSON file written by :meth:`save`."""
        path = Path(path)
        hint = "retrain the tokenizer or point data.tokenizer_path at a valid file"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}; {hint}")
        hint = "retrain the tokenizer (delete this file) or point data.tokenizer_path at a valid file"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"cannot load tokenizer file {path} ({reason}); {hint}") from None
        _check_specials(tok, str(path))
        return cls(tok)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        """Actual number of ids (including the 4 special tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in parallel by the Rust backend."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: stops at the first EOS, skips the other special ids (PAD, BOS,
        UNK) and ids outside the vocabulary. Accepts lists or 1-D tensors."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        size = self.vocab_size
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if NUM_SPECIAL <= i < size:
                kept.append(i)
        text = self._tok.decode(kept, skip_special_tokens=False)
        # Undo the prefix space that encode() added (add_prefix_space=True).
        return text[1:] if text.startswith(" ") else text

    def id_to_token(self, i: int) -> str | None:
        """The token string of id ``i``; None outside the vocabulary."""
        return self._tok.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_or_train_tokenizer(
    path: str | Path, texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> BPETokenizer:
    """Load ``path`` if it exists (so evaluation and resumed runs reuse the same ids);
    otherwise train on ``texts`` and save to ``path``. ``texts`` is only consumed when
    training."""
    path = Path(path)
    if path.exists():
        tok = BPETokenizer.load(path)
        if tok.vocab_size > vocab_size:
            log.warning(
                "reusing tokenizer %s with vocab size %d, larger than the requested %d; "
                "delete the file to retrain with the new size",
                path,
                tok.vocab_size,
                vocab_size,
            )
        else:
            log.info("reusing tokenizer %s (vocab size %d)", path, tok.vocab_size)
        return tok
    tok = BPETokenizer.train(texts, vocab_size, min_frequency=min_frequency)
    tok.save(path)
    log.info("saved tokenizer to %s", path)
    return tok
