"""Finding the checkpoint to resume: the newest one that reads whole, torn ones skipped; sharded folders
published whole, checked against their manifest, and their pickled metadata loaded through an allow-list."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from helpers.sharded import write_sharded
from mha_lightning.atomic import sibling_path
from mha_lightning.checkpoint_folder import MANIFEST, verify, write_manifest
from mha_lightning.checkpoints import META_FILE, consolidate_main, newest_complete, read_info
from mha_lightning.errors import CheckpointError


def save(path, step: int) -> None:
    torch.save(
        {"global_step": step, "hyper_parameters": {"model_config": {"d_model": 8}}, "pad": torch.ones(4096)}, path
    )


def test_newest_complete_skips_torn_files_and_unfinished_sharded_folders(tmp_path):
    assert newest_complete(tmp_path / "nothing") == (None, [])
    save(tmp_path / "step000010.ckpt", 10)
    save(tmp_path / "step000020.ckpt", 20)
    whole = (tmp_path / "step000020.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(whole[: len(whole) // 2])  # a kill -9 mid-write (step 30)
    (tmp_path / "step000030.ckpt").mkdir()  # a sharded save that never wrote its .metadata
    info, skipped = newest_complete(tmp_path)
    assert info.path.name == "step000020.ckpt" and info.global_step == 20
    assert sorted(s.split()[0] for s in skipped) == ["last.ckpt", "step000030.ckpt"]


def test_at_equal_steps_last_wins(tmp_path):
    save(tmp_path / "step000020.ckpt", 20)
    save(tmp_path / "last.ckpt", 20)
    info, _ = newest_complete(tmp_path)
    assert info.path.name == "last.ckpt"


# --------------------------------------------------------------------------- sharded folders
def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sharded_folder_is_published_whole_and_replaces_the_previous(tmp_path):
    last = tmp_path / "last.ckpt"
    write_sharded(last, 10)
    write_sharded(last, 20)
    assert hidden(tmp_path) == [], "no staging or set-aside folder is left behind"
    assert verify(last) == 20 and read_info(last).global_step == 20
    manifest = json.loads((last / MANIFEST).read_text())
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", META_FILE}


def test_torn_shard_is_refused_and_resume_falls_back(tmp_path):
    write_sharded(tmp_path / "step000010.ckpt", 10)
    last = write_sharded(tmp_path / "last.ckpt", 20)
    shard = last / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])  # what an in-place rewrite killed midway leaves
    with pytest.raises(CheckpointError, match="is not the file its manifest lists") as e:
        read_info(last)
    assert "\n" not in str(e.value)
    info, skipped = newest_complete(tmp_path)
    assert info.path.name == "step000010.ckpt"
    assert skipped[0].startswith("last.ckpt (") and "manifest" in skipped[0]


def test_shard_of_another_step_is_refused(tmp_path):
    a = write_sharded(tmp_path / "a.ckpt", 10)
    b = write_sharded(tmp_path / "b.ckpt", 20)
    assert (a / "__0_0.distcp").stat().st_size == (b / "__0_0.distcp").stat().st_size  # sizes alone can't tell
    shutil.copyfile(a / "__0_0.distcp", b / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="from another save"):
        read_info(b)
    (a / "__1_0.distcp").write_bytes((b / ".metadata").read_bytes())  # an extra shard from elsewhere
    with pytest.raises(CheckpointError, match=r"does not list \(__1_0.distcp\)"):
        read_info(a)


def test_unfinished_save_is_not_a_checkpoint(tmp_path):
    last = write_sharded(tmp_path / "last.ckpt", 10)
    (last / MANIFEST).unlink()  # every shard written, never sealed
    with pytest.raises(CheckpointError, match="has no manifest.json: its save did not finish"):
        read_info(last)
    assert newest_complete(tmp_path)[0] is None


def test_kill_between_the_two_renames_leaves_both_checkpoints_findable(tmp_path):
    last = write_sharded(tmp_path / "last.ckpt", 10)
    newer = write_sharded(tmp_path / "newer", 20)
    # publish() moved the old folder aside and was killed before moving the new one in.
    os.rename(last, sibling_path(last, "old"))
    os.rename(newer, sibling_path(last, "tmp"))
    info, skipped = newest_complete(tmp_path)
    assert info.global_step == 20 and info.path.name.startswith(".last.ckpt.tmp-") and skipped == []
    write_sharded(last, 30)  # the next save cleans both up
    assert hidden(tmp_path) == [] and newest_complete(tmp_path)[0].path == last


class WouldRunCode:
    """Unpickling this calls ``pathlib.Path.touch``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(tmp_path, capsys):
    last = write_sharded(tmp_path / "last.ckpt", 10)
    marker = tmp_path / "code-was-run"
    (last / ".metadata").write_bytes(pickle.dumps(WouldRunCode(marker)))
    write_manifest(last, 10)  # sealed like a genuine save: only the metadata check stands in the way
    assert consolidate_main([str(last), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refusing" in err and "pathlib.Path.touch" in err, err
    assert not marker.exists(), "unpickling the crafted metadata ran code"
    assert newest_complete(tmp_path)[0] is None
