"""Reading parallel text (aligned plain-text files or one TSV file) and length filtering.

Every problem with the input raises :class:`~mha_lightning.errors.DataError` with a
one-line message naming the file (and the 1-based line number where there is one), the
bad value and what to do. Nothing is dropped silently: pairs with an empty side and pairs
outside the token-length limits are counted and logged as warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from mha_lightning.errors import ConfigError, DataError

__all__ = ["read_parallel_text", "read_lines", "filter_by_length", "check_kept"]

log = logging.getLogger(__name__)

PathLike = str | Path


def _config_hint(split: str | None) -> str:
    name = split if split else "<split>"
    return f"check the data.{name} path(s) in your config"


def _check_file(path: Path, split: str | None) -> None:
    if not path.exists():
        raise DataError(f"data file not found: {path} ({_config_hint(split)})")
    if not path.is_file():
        raise DataError(f"data path is not a regular file: {path} ({_config_hint(split)})")


def _iter_lines(path: Path, split: str | None) -> Iterator[str]:
    """Yield the lines of ``path`` decoded as UTF-8, without the line terminator.

    Lines are split on ``\\n`` only (``str.splitlines`` would also split on Unicode
    separators such as U+2028 and silently misalign parallel files). A trailing ``\\r`` is
    removed, and a UTF-8 byte-order mark at the start of the file is ignored.
    """
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot open data file {path}: {e.strerror or e} ({_config_hint(split)})") from None
    offset = 0  # byte offset of the start of the current line in the file
    with f:
        for lineno, raw in enumerate(f, start=1):
            body = raw[:-1] if raw.endswith(b"\n") else raw
            start = 0
            if lineno == 1 and body.startswith(b"\xef\xbb\xbf"):
                start = 3
            try:
                text = body[start:].decode("utf-8")
            except UnicodeDecodeError as e:
                bad = body[start + e.start]
                raise DataError(
                    f"{path}: line {lineno} is not valid UTF-8 (byte 0x{bad:02x} at byte offset "
                    f"{offset + start + e.start} in the file); re-encode the file as UTF-8 "
                    f"(e.g. with iconv)"
                ) from None
            nul = body.find(b"\0", start)
            if nul >= 0:
                # Tokenizers keep a NUL as a token and terminals hide it: such a line is a corrupt file, not text.
                raise DataError(
                    f"{path}: line {lineno} holds a NUL byte (byte offset {offset + nul} in the file); remove it "
                    f"(e.g. tr -d '\\000' < {path.name}) or re-export the file"
                )
            offset += len(raw)
            yield text[:-1] if text.endswith("\r") else text


def read_lines(path: PathLike) -> list[str]:
    """The lines of a UTF-8 text file as training reads them (split on ``\\n`` only, a BOM and ``\\r`` removed).

    Raises:
        DataError: a missing file or a directory, bytes that are not UTF-8, a NUL byte; naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"input file {path} {what}; give a text file with one sentence per line")
    return list(_iter_lines(path, None))


def _finish(
    pairs: list[tuple[str, str]], n_empty: int, n_lines: int, where: str, split: str | None
) -> list[tuple[str, str]]:
    if n_empty:
        log.warning(
            "dropped %d of %d line(s) in %s because the source or target side is empty",
            n_empty,
            n_lines,
            where,
        )
    if not pairs:
        detail = f"{n_lines} line(s), all with an empty side" if n_lines else "the file is empty"
        raise DataError(
            f"no non-empty sentence pairs in {where} ({detail}); "
            f"point the data.{split or '<split>'} path(s) at a file with data"
        )
    return pairs


def _read_aligned(src: Path, tgt: Path, split: str | None) -> list[tuple[str, str]]:
    src_lines = list(_iter_lines(src, split))
    tgt_lines = list(_iter_lines(tgt, split))
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"aligned files have different line counts: {src} has {len(src_lines)} line(s) "
            f"but {tgt} has {len(tgt_lines)}; every source line needs exactly one target "
            f"line (check for extra blank lines or mismatched files)"
        )
    pairs: list[tuple[str, str]] = []
    n_empty = 0
    for s, t in zip(src_lines, tgt_lines, strict=True):
        s, t = s.strip(), t.strip()
        if s and t:
            pairs.append((s, t))
        else:
            n_empty += 1
    return _finish(pairs, n_empty, len(src_lines), f"{src} / {tgt}", split)


def _read_tsv(tsv: Path, split: str | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    n_empty = 0
    n_lines = 0
    for lineno, line in enumerate(_iter_lines(tsv, split), start=1):
        n_lines = lineno
        if not line.strip():
            n_empty += 1  # a blank line: counted and logged like any other empty pair
            continue
        n_tabs = line.count("\t")
        if n_tabs != 1:
            raise DataError(
                f"{tsv}: line {lineno} has {n_tabs} tab(s) but a TSV line needs exactly one "
                f"(source<TAB>target); fix or remove that line"
            )
        s, t = line.split("\t")
        s, t = s.strip(), t.strip()
        if s and t:
            pairs.append((s, t))
        else:
            n_empty += 1
    return _finish(pairs, n_empty, n_lines, str(tsv), split)


def read_parallel_text(
    src: PathLike | None = None,
    tgt: PathLike | None = None,
    tsv: PathLike | None = None,
    *,
    split: str | None = None,
) -> list[tuple[str, str]]:
    """Read sentence pairs from two aligned files (``src`` + ``tgt``) or one ``tsv`` file.

    Each side is stripped of surrounding whitespace. Pairs where either side is empty are
    dropped and their count is logged as a warning. ``split`` (e.g. ``"train"``) only makes
    error messages point at the right config key.

    Raises:
        DataError: a missing/unreadable file, both or neither of (src, tgt) / tsv given,
            aligned files of different lengths, a TSV line without exactly one tab,
            bytes that are not UTF-8, or no non-empty pairs at all.
    """
    paths = check_parallel_files(src, tgt, tsv, split=split)
    if len(paths) == 1:
        return _read_tsv(paths[0], split)
    return _read_aligned(paths[0], paths[1], split)


def check_parallel_files(
    src: PathLike | None = None,
    tgt: PathLike | None = None,
    tsv: PathLike | None = None,
    *,
    split: str | None = None,
) -> tuple[Path, ...]:
    """Check, without reading, that a split names existing files: (tsv,) or (src, tgt).

    Cheap enough to run on every rank at start-up, so a bad path stops every process
    with the same one line instead of leaving the others waiting in a barrier."""
    have_aligned = src is not None or tgt is not None
    if have_aligned and tsv is not None:
        raise DataError(
            f"give either src+tgt files or one tsv file, not both "
            f"(got src={src}, tgt={tgt}, tsv={tsv}); {_config_hint(split)}"
        )
    if tsv is not None:
        path = Path(tsv)
        _check_file(path, split)
        return (path,)
    if src is None or tgt is None:
        if not have_aligned:
            raise DataError(
                f"no data files given: set both src and tgt (aligned text files) or tsv; {_config_hint(split)}"
            )
        raise DataError(
            f"aligned text needs both src and tgt files (got src={src}, tgt={tgt}); set the "
            f"missing one or use a single tsv file instead; "
            f"{_config_hint(split)}"
        )
    src_path, tgt_path = Path(src), Path(tgt)
    _check_file(src_path, split)
    _check_file(tgt_path, split)
    return src_path, tgt_path


def check_kept(kept: Sequence, total: int, where: str, min_len: int, max_len: int | None) -> None:
    """An empty training split after the length filter is the same error as an empty file (one line, exit 2):
    training on nothing would stop in Lightning ("no training batches") and report an untrained model."""
    if total and not kept:
        raise DataError(
            f"the length filter dropped all {total} training pair(s) of {where}: each has a side shorter than "
            f"data.min_len={min_len} or longer than data.max_len={max_len} tokens; raise data.max_len (and "
            "model.max_len) or check the file (one very long line: a missing line break?)"
        )


def filter_by_length(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    min_len: int = 1,
    max_len: int | None = None,
    *,
    name: str = "data",
) -> tuple[list[tuple[Sequence[int], Sequence[int]]], int]:
    """Keep the (src_ids, tgt_ids) pairs whose both sides have ``min_len <= len <= max_len``.

    Lengths are those of the id lists as given (count BOS/EOS in ``max_len`` only if the
    caller added them). ``max_len=None`` means no upper limit. ``name`` labels the log
    message (e.g. the split or file). Returns ``(kept, n_dropped)``; the number dropped for
    being too short and too long is logged as a warning.
    """
    if min_len < 0:
        raise ConfigError(f"min_len must be >= 0, got {min_len}; fix the length filter setting")
    if max_len is not None and max_len < min_len:
        raise ConfigError(
            f"max_len ({max_len}) is smaller than min_len ({min_len}); "
            f"fix the length filter settings so that min_len <= max_len"
        )
    kept: list[tuple[Sequence[int], Sequence[int]]] = []
    too_short = too_long = 0
    for pair in pairs:
        s, t = pair
        shortest = min(len(s), len(t))
        longest = max(len(s), len(t))
        if shortest < min_len:
            too_short += 1
        elif max_len is not None and longest > max_len:
            too_long += 1
        else:
            kept.append(pair)
    n_dropped = too_short + too_long
    if n_dropped:
        log.warning(
            "length filter dropped %d of %d pair(s) in %s: %d shorter than min_len=%d "
            "tokens, %d longer than max_len=%s tokens (on either side)",
            n_dropped,
            len(pairs),
            name,
            too_short,
            min_len,
            too_long,
            max_len,
        )
    return kept, n_dropped
