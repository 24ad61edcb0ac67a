"""AtomicCheckpointIO on real files with real torch.save: a checkpoint appears only when complete,
a failed save leaves the previous one byte-identical and no temporary file, and `train()` uses it."""

from __future__ import annotations

import collections
import os
import resource
import signal
from pathlib import Path

import pytest
import torch

from helpers.config import QUIET, compose_train_config
from mha_lightning.checkpoint_io import AtomicCheckpointIO, AtomicModelParallelStrategy, temporary_path
from mha_lightning.config import preflight
from mha_lightning.errors import CheckpointError
from mha_lightning.train import build_trainer, train

MiB = 1 << 20


def big_checkpoint(fill: float, extra: dict | None = None) -> dict:
    """About 8 MiB of tensors first, then anything in ``extra`` (pickled after them)."""
    return {
        "state_dict": {f"w{i}": torch.full((MiB // 4,), fill + i) for i in range(8)},
        "global_step": int(fill),
        **(extra or {}),
    }


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_save_round_trips_and_leaves_no_temporary_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"  # the folder is created, as Lightning's save does
    io.save_checkpoint(big_checkpoint(1.0), path)
    io.save_checkpoint(big_checkpoint(2.0), path)  # over an existing checkpoint

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["global_step"] == 2
    for i in range(8):
        assert torch.equal(loaded["state_dict"][f"w{i}"], torch.full((MiB // 4,), 2.0 + i))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    # The inherited load reads it back too.
    assert io.load_checkpoint(path, weights_only=True)["global_step"] == 2

    # Created with the umask, like any new file (not 0600 as tempfile.mkstemp would).
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


class Observer:
    """Pickled inside torch.save, i.e. while the checkpoint is being written: records what the
    target's directory and TMPDIR hold at that moment, then (``fail``) raises or pickles as an
    empty OrderedDict (allowed by weights_only loading)."""

    def __init__(self, target: Path, tmpdir: Path | None = None, fail: bool = False):
        self.target, self.tmpdir, self.fail = target, tmpdir, fail
        self.seen: dict = {}

    def __reduce__(self):
        self.seen = {
            "dir": sorted(p.name for p in self.target.parent.iterdir()),
            "target": self.target.read_bytes() if self.target.exists() else None,
            "tmpdir": sorted(os.listdir(self.tmpdir)) if self.tmpdir else None,
        }
        if self.fail:
            raise RuntimeError("cannot pickle this on purpose")
        return (collections.OrderedDict, ())


def test_new_checkpoint_is_written_beside_the_target_and_previous_stays_readable(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(big_checkpoint(1.0), path)
    before = path.read_bytes()

    tmpdir = None
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        # Another filesystem than tmp_path's: where a copy instead of a rename would happen.
        tmpdir = Path("/dev/shm") / f"atomic-ckpt-test-{os.getpid()}-{tmp_path.name}"
        tmpdir.mkdir()
        monkeypatch.setenv("TMPDIR", str(tmpdir))
    try:
        observer = Observer(path, tmpdir)
        AtomicCheckpointIO().save_checkpoint(big_checkpoint(2.0, {"observer": observer}), path)
        if tmpdir is not None:
            assert observer.seen["tmpdir"] == [] and os.listdir(tmpdir) == []
    finally:
        if tmpdir is not None:
            tmpdir.rmdir()  # fails (and so does the test) if anything was left there

    # While the new checkpoint was being written: a hidden temporary file beside the target, and the
    # target still the previous checkpoint, whole.
    (writing,) = [n for n in observer.seen["dir"] if n != "last.ckpt"]
    assert writing.startswith(f".last.ckpt.tmp-{os.getpid()}-"), observer.seen["dir"]
    assert observer.seen["target"] == before
    # Afterwards: only the new one.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == 2


def test_temporary_path_is_hidden_beside_the_target_and_unique(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    a, b = temporary_path(path), temporary_path(str(path))
    assert a.parent == b.parent == path.parent
    assert a != b
    assert a.name.startswith(f".last.ckpt.tmp-{os.getpid()}-")
    assert not a.name.endswith(".ckpt")  # never listed as a checkpoint


def test_failure_while_pickling_propagates_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(big_checkpoint(1.0), path)
    before = path.read_bytes()

    # torch.save pickles the whole dict before it writes tensor bytes, so the tensors being first
    # does not put them on disk before this fails; the temporary file already exists, though
    # (observed below). A failure after megabytes were written: the EFBIG test.
    observer = Observer(path, fail=True)
    with pytest.raises(RuntimeError, match="cannot pickle this on purpose") as failure:
        io.save_checkpoint(big_checkpoint(2.0, {"bad": observer}), path)
    assert not isinstance(failure.value, CheckpointError)  # not an OSError: unchanged

    assert any(n.startswith(".last.ckpt.tmp-") for n in observer.seen["dir"]), observer.seen["dir"]
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
@pytest.mark.parametrize(
    # Within the first tensor, torch.save itself raises a RuntimeError while handling the write's
    # OSError; at 2 MiB, closing the file raises the OSError again. Both are a failed write.
    "limit",
    [64 << 10, 2 * MiB],
    ids=["torch-raises", "close-raises"],
)
def test_write_error_midway_keeps_the_previous_checkpoint_and_is_one_line(tmp_path, limit):
    """A real OSError after part of an 8 MiB checkpoint was written: the process's file-size
    limit makes the write fail with EFBIG, as a full disk fails with ENOSPC."""
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(16)}, path)
    before = path.read_bytes()

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(CheckpointError) as failure:
            io.save_checkpoint(big_checkpoint(2.0), path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)

    message = str(failure.value)
    assert message == f"cannot write checkpoint {path} (File too large); the previous checkpoint is intact"
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("below", ["last.ckpt", "sub/last.ckpt"])
def test_unwritable_location_is_one_line_naming_the_path(tmp_path, below):
    # Root ignores permission bits; a regular file where a directory should be stops root too.
    blocker = tmp_path / "not_a_dir"
    blocker.write_bytes(b"a file")
    path = blocker / below

    with pytest.raises(CheckpointError) as failure:
        AtomicCheckpointIO().save_checkpoint(big_checkpoint(1.0), path)

    message = str(failure.value)
    assert "\n" not in message
    assert message == f"cannot write checkpoint {path} (Not a directory); nothing was written"
    assert blocker.read_bytes() == b"a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]


def test_storage_options_are_refused_like_lightning(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "a.ckpt", storage_options={"k": 1})
    assert list(tmp_path.iterdir()) == []


def test_remote_paths_are_left_to_lightning():
    # fsspec's in-memory filesystem stands for s3:// and the like: no local rename to make atomic.
    fsspec = pytest.importorskip("fsspec")
    io = AtomicCheckpointIO()
    path = f"memory://atomic-ckpt-test-{os.getpid()}/last.ckpt"
    try:
        io.save_checkpoint({"global_step": 3, "w": torch.arange(4)}, path)
        loaded = io.load_checkpoint(path, weights_only=True)
        assert loaded["global_step"] == 3 and torch.equal(loaded["w"], torch.arange(4))
        assert not Path("memory:").exists()  # nothing written locally under a literal "memory:" folder
    finally:
        fsspec.filesystem("memory").rm(f"/atomic-ckpt-test-{os.getpid()}", recursive=True)


SHORT = [
    *QUIET,
    "logger=none",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "data.num_val=16",
    "data.num_test=16",
    "test=false",
]


def test_train_saves_through_atomic_checkpoint_io(tmp_path):
    cfg = compose_train_config(tmp_path / "run", SHORT)
    # The trainer train() builds, built the same way here: its strategy saves through the plugin.
    trainer = build_trainer(cfg, preflight(cfg), loggers=[])
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "last.ckpt" in names and any(n.startswith("step") for n in names), names
    assert leftovers(ckpts) == []
    for name in names:
        ckpt = torch.load(ckpts / name, map_location="cpu", weights_only=True)
        assert ckpt["global_step"] in (2, 4) and ckpt["state_dict"], name
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4


def test_sharded_runs_keep_their_own_checkpointing(tmp_path):
    # The strategy writes sharded folders itself (staged, then published): no single-file CheckpointIO.
    cfg = compose_train_config(tmp_path / "run", [*SHORT, "trainer.devices=2", "parallel.tensor_parallel_size=2"])
    plan = preflight(cfg)
    assert plan.world_size == 2
    trainer = build_trainer(cfg, plan, loggers=[])
    assert type(trainer.strategy) is AtomicModelParallelStrategy
    assert not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
