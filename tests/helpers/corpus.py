"""A toy word-for-word German -> English 'translation' corpus on disk."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = {
    "der": "the",
    "hund": "dog",
    "katze": "cat",
    "sieht": "sees",
    "ein": "a",
    "rote": "red",
    "grosse": "big",
    "kleine": "small",
    "haus": "house",
    "mann": "man",
    "frau": "woman",
    "und": "and",
    "läuft": "runs",
    "schläft": "sleeps",
    "im": "in the",
    "garten": "garden",
    "blaue": "blue",
    "auto": "car",
}


def write_corpus(folder: Path, n_train: int = 200, n_val: int = 40) -> dict[str, Path]:
    """Aligned files for train ({"src", "tgt"}), a TSV for val ({"tsv"})."""
    rng = random.Random(0)
    vocab = sorted(WORDS)

    def pair() -> tuple[str, str]:
        src = [rng.choice(vocab) for _ in range(rng.randint(3, 7))]
        return " ".join(src), " ".join(WORDS[w] for w in src)

    train_pairs = [pair() for _ in range(n_train)]
    val_pairs = [pair() for _ in range(n_val)]
    folder.mkdir(parents=True, exist_ok=True)
    files = {"src": folder / "train.de", "tgt": folder / "train.en", "tsv": folder / "val.tsv"}
    files["src"].write_text("".join(s + "\n" for s, _ in train_pairs), encoding="utf-8")
    files["tgt"].write_text("".join(t + "\n" for _, t in train_pairs), encoding="utf-8")
    files["tsv"].write_text("".join(f"{s}\t{t}\n" for s, t in val_pairs), encoding="utf-8")
    return files
