"""Finding the checkpoint to resume: the newest one that reads whole, torn ones skipped."""

from __future__ import annotations

import torch

from mha_lightning.checkpoints import newest_complete


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
