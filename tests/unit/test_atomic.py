"""Files written whole or not at all (``mha_lightning.atomic``)."""

from __future__ import annotations

import pytest

from mha_lightning.atomic import atomic_file, atomic_path, write_text_atomic


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "report.md"
    write_text_atomic(target, "first")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_file(target) as f:
        f.write("half of the sec")
        raise RuntimeError("mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_finished_write_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "deep" / "tokenizer.json"
    with atomic_path(target, durable=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tokenizer.json.tmp-")
        tmp.write_text("{}")
        assert not target.exists()  # nothing at the target until the block ends
    assert target.read_text() == "{}" and sorted(p.name for p in target.parent.iterdir()) == ["tokenizer.json"]
