"""Tests for mha_lightning.data.text (reading parallel text) and .tokenizer (BPE)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mha_lightning.data.text import filter_by_length, read_parallel_text
from mha_lightning.data.tokenizer import BPETokenizer, load_or_train_tokenizer
from mha_lightning.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from mha_lightning.errors import ConfigError, DataError, UserError

DE = [
    "Der Hund läuft schnell über die Straße.",
    "Die Katze schläft auf dem Sofa.",
    "Ich trinke jeden Morgen einen Kaffee.",
    "Das Wetter ist heute sehr schön.",
    "Wir fahren am Wochenende in die Berge.",
    "Mein Bruder wohnt in einer großen Stadt.",
    "Kannst du mir bitte das Salz geben?",
    "Der Zug kommt um acht Uhr an.",
    "Sie liest ein Buch über Geschichte.",
    "Im Sommer gehen wir oft schwimmen.",
    "Das Restaurant war leider geschlossen.",
    "Er hat seinen Schlüssel verloren.",
    "Die Kinder spielen im Garten.",
    "Wie viel kostet diese Jacke?",
    "Morgen regnet es wahrscheinlich.",
    "Ich habe keine Zeit, tut mir leid.",
    "Das Museum öffnet um zehn Uhr.",
    "Unsere Nachbarn sind sehr freundlich.",
    "Der Film hat mir gut gefallen.",
    "Bitte schließen Sie die Tür.",
    "Wo ist der nächste Bahnhof?",
    "Sie arbeitet als Ärztin im Krankenhaus.",
    "Wir haben gestern Pizza gegessen.",
    "Die Straße ist nass und rutschig.",
    "Ich lerne seit zwei Jahren Deutsch.",
]
EN = [
    "The dog runs quickly across the street.",
    "The cat is sleeping on the sofa.",
    "I drink a coffee every morning.",
    "The weather is very nice today.",
    "We are going to the mountains at the weekend.",
    "My brother lives in a big city.",
    "Can you please pass me the salt?",
    "The train arrives at eight o'clock.",
    "She is reading a book about history.",
    "In summer we often go swimming.",
    "Unfortunately the restaurant was closed.",
    "He has lost his key.",
    "The children are playing in the garden.",
    "How much does this jacket cost?",
    "It will probably rain tomorrow.",
    "I have no time, I'm sorry.",
    "The museum opens at ten o'clock.",
    "Our neighbours are very friendly.",
    "I liked the film a lot.",
    "Please close the door.",
    "Where is the nearest station?",
    "She works as a doctor in the hospital.",
    "We ate pizza yesterday.",
    "The road is wet and slippery.",
    "I have been learning German for two years.",
]
CORPUS = DE + EN  # 50 lines


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_bytes(text.encode("utf-8"))
    return path


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert isinstance(err.value, UserError)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------- reading


def test_read_aligned_files(tmp_path):
    src = write(tmp_path / "train.de", "\n".join(DE[:3]) + "\n")
    tgt = write(tmp_path / "train.en", "  " + "\r\n".join(EN[:3]) + "\r\n")
    pairs = read_parallel_text(src=src, tgt=str(tgt))
    assert pairs == list(zip(DE[:3], EN[:3], strict=True))


def test_read_aligned_without_trailing_newline_and_bom(tmp_path):
    src = write(tmp_path / "a.src", b"\xef\xbb\xbfeins\nzwei")
    tgt = write(tmp_path / "a.tgt", "one\ntwo\n")
    assert read_parallel_text(src, tgt) == [("eins", "one"), ("zwei", "two")]


def test_read_tsv(tmp_path):
    tsv = write(tmp_path / "train.tsv", "".join(f" {d}\t{e} \r\n" for d, e in zip(DE, EN, strict=True)))
    pairs = read_parallel_text(tsv=tsv)
    assert pairs == list(zip(DE, EN, strict=True))


def test_unicode_line_separator_does_not_split_lines(tmp_path):
    # str.splitlines() would split on U+2028 and misalign the files.
    src = write(tmp_path / "s.txt", "a\u2028b\nc\n")
    tgt = write(tmp_path / "t.txt", "x\ny\n")
    assert read_parallel_text(src, tgt) == [("a\u2028b", "x"), ("c", "y")]


def test_missing_file(tmp_path):
    tgt = write(tmp_path / "t.txt", "x\n")
    missing = tmp_path / "nope.src"
    with pytest.raises(DataError) as err:
        read_parallel_text(src=missing, tgt=tgt, split="train")
    assert_one_line(err, str(missing), "data.train")
    with pytest.raises(DataError) as err:
        read_parallel_text(tsv=tmp_path / "missing.tsv")
    assert_one_line(err, "missing.tsv", "data.")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"src": "a.txt"},
        {"tgt": "b.txt"},
        {"src": "a.txt", "tgt": "b.txt", "tsv": "c.tsv"},
        {"src": "a.txt", "tsv": "c.tsv"},
    ],
)
def test_both_or_neither_sources(tmp_path, kwargs):
    for name in ("a.txt", "b.txt", "c.tsv"):
        write(tmp_path / name, "x\ty\n" if name.endswith("tsv") else "x\n")
    kwargs = {k: tmp_path / v for k, v in kwargs.items()}
    with pytest.raises(DataError) as err:
        read_parallel_text(**kwargs)
    assert_one_line(err, "tsv")


def test_line_count_mismatch(tmp_path):
    src = write(tmp_path / "x.de", "a\nb\nc\n")
    tgt = write(tmp_path / "x.en", "a\nb\n")
    with pytest.raises(DataError) as err:
        read_parallel_text(src, tgt)
    assert_one_line(err, str(src), str(tgt), "3", "2")


@pytest.mark.parametrize("bad_line,n_tabs", [("no tab here", 0), ("a\tb\tc", 2)])
def test_tsv_wrong_number_of_tabs(tmp_path, bad_line, n_tabs):
    tsv = write(tmp_path / "bad.tsv", f"a\tb\nc\td\n{bad_line}\ne\tf\n")
    with pytest.raises(DataError) as err:
        read_parallel_text(tsv=tsv)
    assert_one_line(err, str(tsv), "line 3", f"{n_tabs} tab")


def test_non_utf8(tmp_path):
    src = write(tmp_path / "latin1.de", b"gut\n" + "Straße\n".encode("latin-1"))
    tgt = write(tmp_path / "ok.en", "good\nstreet\n")
    with pytest.raises(DataError) as err:
        read_parallel_text(src, tgt)
    # "gut\n" is 4 bytes, then "Stra" -> the bad byte 0xdf is at offset 8.
    assert_one_line(err, str(src), "line 2", "offset 8", "0xdf", "UTF-8")
    tsv = write(tmp_path / "bad.tsv", b"a\tb\n\xff\tc\n")
    with pytest.raises(DataError) as err:
        read_parallel_text(tsv=tsv)
    assert_one_line(err, str(tsv), "line 2", "offset 4")


def test_empty_split(tmp_path):
    empty = write(tmp_path / "empty.tsv", "")
    with pytest.raises(DataError) as err:
        read_parallel_text(tsv=empty)
    assert_one_line(err, str(empty))
    blank_src = write(tmp_path / "blank.de", "\n  \nx\n")
    blank_tgt = write(tmp_path / "blank.en", "a\nb\n \n")
    with pytest.raises(DataError) as err:
        read_parallel_text(blank_src, blank_tgt, split="valid")
    assert_one_line(err, str(blank_src), str(blank_tgt))


def test_empty_lines_dropped_and_logged(tmp_path, caplog):
    src = write(tmp_path / "d.de", "eins\n\nzwei\ndrei\n   \n")
    tgt = write(tmp_path / "d.en", "one\ntwo\n\nthree\nfour\n")
    with caplog.at_level(logging.WARNING, logger="mha_lightning.data.text"):
        pairs = read_parallel_text(src, tgt)
    assert pairs == [("eins", "one"), ("drei", "three")]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped 3" in m and str(src) in m for m in msgs), msgs

    caplog.clear()
    tsv = write(tmp_path / "d.tsv", "a\tb\n\n \t x\nc\t\nd\te\n")
    with caplog.at_level(logging.WARNING, logger="mha_lightning.data.text"):
        pairs = read_parallel_text(tsv=tsv)
    assert pairs == [("a", "b"), ("d", "e")]
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped 3" in m and str(tsv) in m for m in msgs), msgs


def test_filter_by_length(caplog):
    pairs = [([5] * n, [6] * m) for n, m in [(1, 1), (3, 3), (0, 2), (5, 4), (4, 9)]]
    with caplog.at_level(logging.WARNING, logger="mha_lightning.data.text"):
        kept, n_dropped = filter_by_length(pairs, min_len=1, max_len=5, name="train")
    assert kept == [pairs[0], pairs[1], pairs[3]]
    assert n_dropped == 2
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 2" in msg and "train" in msg and "1 shorter" in msg and "1 longer" in msg
    assert filter_by_length(pairs, 0, None) == (pairs, 0)
    with pytest.raises(ConfigError):
        filter_by_length(pairs, 5, 2)


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


def test_special_ids_and_vocab_size(tokenizer):
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tokenizer.id_to_token(i) == tok
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert 4 + 256 < tokenizer.vocab_size <= 400
    small = BPETokenizer.train(iter(CORPUS), vocab_size=60)
    assert small.vocab_size <= 60
    assert [small.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)


def test_encode_has_no_specials_and_decode_round_trips(tokenizer):
    for s in CORPUS + ["Völlig neue Wörter: Quarkstrudel & Ωmega 東京!", "two  spaces"]:
        ids = tokenizer.encode(s)
        assert ids and all(i >= 4 for i in ids), (s, ids)
        assert tokenizer.decode(ids) == s


def test_decode_stops_at_eos_and_skips_specials(tokenizer):
    a, b = tokenizer.encode("Der Hund"), tokenizer.encode("läuft")
    ids = [BOS_ID] + a + [UNK_ID, PAD_ID] + [EOS_ID] + b + [PAD_ID]
    assert tokenizer.decode(ids) == "Der Hund"
    assert tokenizer.decode([EOS_ID] + a) == ""
    torch = pytest.importorskip("torch")
    assert tokenizer.decode(torch.tensor([BOS_ID] + a + [EOS_ID])) == "Der Hund"


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    tokenizer.save(path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["tok.json"]
    loaded = BPETokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    for s in CORPUS:
        assert loaded.encode(s) == tokenizer.encode(s)


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError) as err:
        BPETokenizer.load(tmp_path / "absent.json")
    assert_one_line(err, "absent.json", "data.tokenizer_path")
    corrupt = write(tmp_path / "corrupt.json", '{"version": "1.0", "model": {\n  broken')
    with pytest.raises(DataError) as err:
        BPETokenizer.load(corrupt)
    assert_one_line(err, str(corrupt), "data.tokenizer_path", "retrain")


def test_load_or_train_reuses_file(tmp_path):
    path = tmp_path / "tok.json"
    first = load_or_train_tokenizer(path, CORPUS, vocab_size=300)
    assert path.is_file()

    def must_not_be_read():
        raise AssertionError("texts consumed although the tokenizer file exists")
        yield  # pragma: no cover

    second = load_or_train_tokenizer(path, must_not_be_read(), vocab_size=300)
    assert [second.encode(s) for s in CORPUS] == [first.encode(s) for s in CORPUS]


def test_train_rejects_bad_input():
    with pytest.raises(DataError):
        BPETokenizer.train(["", ""], vocab_size=300)
    with pytest.raises(ConfigError):
        BPETokenizer.train(CORPUS, vocab_size=4)
