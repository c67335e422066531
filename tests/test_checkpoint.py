"""Checkpoints: exact round trips, mismatch errors, corruption, and saves killed midway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax.training import TrainState, restore, save

ROOT = Path(__file__).resolve().parent.parent
TMP = ".orbax-checkpoint-tmp"  # in the name of a version orbax has not renamed into place yet

# A read of a checkpoint with missing files fails in several orbax futures at once; the
# first becomes the ValueError, the others are reported when the event loop is collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(seed=0, width=3):
    """A TrainState with BatchNorm parameters and state, a bf16 leaf and momentum."""
    rng = np.random.default_rng(seed)
    bn = bnjax.BatchNorm()
    bn_params, bn_state = bn.init((2, width))
    params = {
        "dense": jnp.asarray(rng.standard_normal((4, width)), jnp.float32),
        "emb": jnp.asarray(rng.standard_normal((2, width)), jnp.bfloat16),
        "bn": bn_params._replace(scale=jnp.asarray(rng.random(width), jnp.float32)),
    }
    bn_state = bn_state._replace(
        mean=jnp.asarray(rng.standard_normal(width), jnp.float32),
        count=jnp.asarray(seed + 7, jnp.int32),
    )
    opt = optax.sgd(0.1, momentum=0.9)
    state = TrainState.create(params, bn_state, opt)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = opt.update(grads, state.opt_state, params)
    return state._replace(step=jnp.asarray(seed + 3, jnp.int32), opt_state=opt_state)


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    state = make_state(1)
    version = save(tmp_path / "ckpt", state)
    assert version == tmp_path / "ckpt" / "000001"
    restored = restore(tmp_path / "ckpt", like=make_state(2))
    assert_identical(restored, state)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.bn_state, bnjax.BatchNormState)


def test_a_version_copied_under_another_name_restores(tmp_path):
    version = save(tmp_path / "ckpt", make_state(1))
    shutil.copytree(version, tmp_path / "best")
    assert_identical(restore(tmp_path / "best", make_state()), make_state(1))


def test_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = make_state(4)
    save("relative/ckpt", state)
    assert_identical(restore("relative/ckpt", like=state), state)


def test_versions_keep_the_newest(tmp_path):
    path = tmp_path / "ckpt"
    for seed in range(4):
        save(path, make_state(seed), keep=2)
    assert sorted(p.name for p in path.iterdir()) == ["000003", "000004"]
    assert_identical(restore(path, make_state(0)), make_state(3))
    assert_identical(restore(path / "000003", make_state(0)), make_state(2))
    with pytest.raises(ValueError, match=r"keep=0 is out of range; expected an int >= 1"):
        save(path, make_state(), keep=0)
    with pytest.raises(TypeError, match="keep must be an int"):
        save(path, make_state(), keep="2")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        restore(tmp_path / "empty", make_state())
    assert not (tmp_path / "empty").exists()  # a reader creates nothing


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s._replace(params={**s.params, "extra": jnp.ones(2)}), ["params.extra"]),
        (lambda s: s._replace(params={k: s.params[k] for k in ("bn", "dense")}), ["params.emb"]),
        (lambda s: make_state(width=5), ["params.bn.scale", "shape (3,)", "(5,)"]),
        (
            lambda s: s._replace(
                params={**s.params, "dense": s.params["dense"].astype(jnp.float16)}
            ),
            ["params.dense", "dtype float32", "float16"],
        ),
        (lambda s: s._replace(step=jnp.asarray(1.0)), ["'step'", "int32", "float32"]),
        (lambda s: s.params, ["does not match like"]),
    ],
)
def test_restore_into_another_model_names_the_first_mismatching_leaf(tmp_path, change, words):
    save(tmp_path, make_state())
    with pytest.raises(ValueError) as info:
        restore(tmp_path, like=change(make_state()))
    for word in words:
        assert word in str(info.value)


def manifest_file(version: Path) -> Path:
    """The JSON file of a version's manifest item (orbax names it ``metadata``)."""
    return version / "manifest" / "metadata"


def complete_versions(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.isdigit())


def _largest_file(directory: Path) -> Path:
    files = [p for p in directory.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 16, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "checksum", "manifest", "data_dir"])
def test_corrupted_or_truncated_checkpoint_is_refused(tmp_path, damage):
    big = make_state()._replace(params={**make_state().params, "big": jnp.arange(4096.0)})
    version = save(tmp_path, big)
    target = _largest_file(version / "state")
    if damage == "flip":
        _flip_bytes(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "checksum":
        manifest = json.loads(manifest_file(version).read_text())
        manifest["leaves"][0]["sha256"] = "0" * 64
        manifest_file(version).write_text(json.dumps(manifest))
    elif damage == "manifest":
        manifest_file(version).write_text('{"format": "bnjax-checkpoint-1", "lea')
    else:
        for p in (version / "state").rglob("*"):
            if p.is_file() and p.parent.name == "d":
                p.unlink()
    with pytest.raises(ValueError, match=r"corrupted|truncated"):
        restore(tmp_path, big)


CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import jax.numpy as jnp, numpy as np
    from bnjax._src import checkpoint

    path, stage = sys.argv[1], sys.argv[2]
    big = np.random.default_rng(1).standard_normal(2_000_000).astype(np.float32)
    state = {"big": jnp.asarray(big), "step": jnp.asarray(1, jnp.int32)}

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "before_fsync":
        checkpoint.fsync_tree = die
    elif stage == "before_rename":  # the rename that publishes the version, not an item's
        rename = os.rename
        os.rename = lambda src, dst: die() if os.path.dirname(dst) == path else rename(src, dst)
    elif stage == "while_discarding":  # orbax removes a retired version with shutil.rmtree
        def rmtree_midway(target, *args, **kwargs):
            files = [os.path.join(d, f) for d, _, names in os.walk(target) for f in names]
            if files:  # one file gone, the rest left: a version half removed
                os.remove(max(files, key=os.path.getsize))
            die()
        shutil.rmtree = rmtree_midway
    print("saving", flush=True)
    checkpoint.save(path, state, keep=1)
    print("saved", flush=True)
    """
)


def _first_state():
    return {"big": jnp.zeros(2_000_000, jnp.float32), "step": jnp.asarray(0, jnp.int32)}


def _run_child(path: Path, stage: str, script: Path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), stage],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        if stage == "timed":  # SIGKILL as soon as the save starts writing its files
            assert proc.stdout.readline().strip() == "saving"
            deadline = time.monotonic() + 60
            while not any(p.iterdir() for p in path.glob(f"*{TMP}*")):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("timed", marks=pytest.mark.slow),
        pytest.param("before_fsync", marks=pytest.mark.slow),
        "before_rename",
        pytest.param("while_discarding", marks=pytest.mark.slow),
    ],
)
def test_save_killed_midway_leaves_a_restorable_checkpoint(tmp_path, stage):
    path = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    first = _first_state()
    save(path, first)
    _run_child(path, stage, script)
    restored = restore(path, like=first)
    if stage == "while_discarding":  # the new version was complete before the kill
        assert int(restored["step"]) == 1
        expected = np.random.default_rng(1).standard_normal(2_000_000).astype(np.float32)
        np.testing.assert_array_equal(restored["big"], expected)
    else:
        assert complete_versions(path) == ["000001"]
        assert any(path.glob(f"*{TMP}*")), "the kill did not interrupt the save"
        assert_identical(restored, first)
    later = {"big": jnp.ones(2_000_000, jnp.float32), "step": jnp.asarray(2, jnp.int32)}
    save(path, later)
    assert complete_versions(path) == sorted(p.name for p in path.iterdir())  # no leftover
    assert_identical(restore(path, like=first), later)


def test_sharded_state_restores_onto_the_shardings_of_like(tmp_path):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",))
    state = make_state(5)
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    wide = jax.device_put(jnp.arange(32.0), NamedSharding(mesh, P("data")))
    tree = {"state": replicated, "wide": wide}
    save(tmp_path, tree)
    restored = restore(tmp_path, like=tree)
    assert_identical(restored, tree)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_save_fsyncs_every_file_and_directory(tmp_path, monkeypatch):
    """A checkpoint is durable before it is published: every file written and the
    directories holding them go through ``os.fsync``."""
    synced = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc") else fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    version = save(tmp_path / "ckpt", make_state())
    files = [p for p in version.rglob("*") if p.is_file()]
    assert files, "the checkpoint wrote no file"
    if os.path.exists("/proc"):
        names = {Path(s).name for s in synced}
        missing = [p.relative_to(version) for p in files if p.name not in names]
        assert not missing, f"not fsynced: {missing}"
        assert str(tmp_path / "ckpt") in synced  # the rename into place, too
    else:  # pragma: no cover - no /proc to name the descriptors
        assert len(synced) >= len(files) + 1


def test_default_keep_is_two(tmp_path):
    path = tmp_path / "ckpt"
    for seed in range(3):
        save(path, make_state(seed))  # keep not given
    assert sorted(p.name for p in path.iterdir()) == ["000002", "000003"]


def test_structure_mismatch_with_equal_dotted_names_is_not_called_corruption(tmp_path):
    """``{"a.b": x}`` and ``{"a": {"b": x}}`` have the same dotted leaf name; the keys tell
    them apart, and the message says the checkpoint is intact (it said "corrupted")."""
    x = jnp.arange(3.0)
    save(tmp_path, {"a.b": x})
    with pytest.raises(ValueError, match="another structure") as info:
        restore(tmp_path, {"a": {"b": x}})
    assert "corrupted" not in str(info.value)
    assert_identical(restore(tmp_path, {"a.b": x}), {"a.b": x})


def test_manifest_missing_a_field_is_reported_as_corruption(tmp_path):
    version = save(tmp_path, make_state(0))
    manifest = json.loads(manifest_file(version).read_text())
    del manifest["leaves"][1]["dtype"]
    manifest_file(version).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"corrupted: manifest entry 1 lacks \['dtype'\]"):
        restore(tmp_path, make_state(0))


def test_zero_size_leaf_is_refused_by_name_and_leaves_nothing_behind(tmp_path):
    state = {"w": jnp.ones(3), "empty": jnp.zeros((0, 4))}
    with pytest.raises(ValueError, match=r"leaf 'empty' has shape \(0, 4\)"):
        save(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_reader_retries_a_version_retired_while_it_reads(tmp_path, monkeypatch):
    """With ``keep=1`` a writer removes the version a reader has just picked; the reader
    reads the newest one instead of reporting corruption."""
    from bnjax._src import checkpoint

    save(tmp_path, make_state(0), keep=1)
    real = checkpoint.read_arrays
    calls = []

    def racing(version, like):
        if not calls:  # the writer saves and retires this version mid-read
            calls.append(version)
            save(tmp_path, make_state(1), keep=1)
        return real(version, like)

    monkeypatch.setattr(checkpoint, "read_arrays", racing)
    assert_identical(restore(tmp_path, make_state(0)), make_state(1))
    assert len(calls) == 1
    # A version given by path is not retried: its damage is reported.
    with pytest.raises((ValueError, OSError)):
        restore(calls[0], make_state(0))


@pytest.mark.parametrize("extra_in", ["like", "checkpoint"])
def test_a_leaf_beyond_the_end_is_named(tmp_path, extra_in):
    """One more leaf after all the others: the structures agree up to it."""
    plain = {"state": make_state()}
    more = {**plain, "zz_extra": jnp.ones(2)}  # sorted last
    save(tmp_path, more if extra_in == "checkpoint" else plain)
    like = more if extra_in == "like" else plain
    where = "like" if extra_in == "like" else "the checkpoint"
    with pytest.raises(ValueError, match=rf"leaf 'zz_extra' exists only in {where}"):
        restore(tmp_path, like)


def test_a_version_without_its_manifest_is_corrupted_not_missing(tmp_path):
    version = save(tmp_path, make_state())
    manifest_file(version).unlink()
    with pytest.raises(ValueError, match="corrupted or incomplete: cannot read its manifest"):
        restore(version, make_state())
    shutil.rmtree(version / "manifest")  # the whole item
    with pytest.raises(ValueError, match="corrupted or incomplete: cannot read its manifest"):
        restore(tmp_path, make_state())


@pytest.mark.parametrize("text", ['{"format": "another-format-2", "leaves": []}', "[1, 2]"])
def test_a_manifest_of_another_format_is_refused(tmp_path, text):
    version = save(tmp_path, make_state())
    manifest_file(version).write_text(text)
    with pytest.raises(ValueError, match="its manifest is not a bnjax-checkpoint-1 manifest"):
        restore(tmp_path, make_state())


def test_damage_is_reported_at_once(tmp_path, monkeypatch):
    """A damaged version that is still there is refused on the first read, not retried."""
    from bnjax._src import checkpoint

    version = save(tmp_path, make_state())
    manifest = json.loads(manifest_file(version).read_text())
    manifest["leaves"][0]["sha256"] = "0" * 64
    manifest_file(version).write_text(json.dumps(manifest))
    real, reads = checkpoint.read_arrays, []
    monkeypatch.setattr(checkpoint, "read_arrays", lambda *a: reads.append(1) or real(*a))
    with pytest.raises(ValueError, match="does not match the checksum"):
        restore(tmp_path, make_state())
    assert len(reads) == 1


def test_reader_outlasting_a_writer_that_retires_every_version_it_picks(tmp_path, monkeypatch):
    """Every retry loses its version to the writer; the last read still succeeds."""
    from bnjax._src import checkpoint

    save(tmp_path, make_state(0), keep=1)
    real, reads = checkpoint.read_arrays, []

    def racing(version, like):
        reads.append(version.name)
        if len(reads) <= checkpoint.RETRIES:
            save(tmp_path, make_state(len(reads)), keep=1)  # retires `version`
        return real(version, like)

    monkeypatch.setattr(checkpoint, "read_arrays", racing)
    assert_identical(restore(tmp_path, make_state(0)), make_state(checkpoint.RETRIES))
    assert len(reads) == checkpoint.RETRIES + 1


def test_an_error_without_a_message_is_still_reported(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    save(tmp_path, make_state())
    real = ocp.Checkpointer.restore

    def restore_failing(self, directory, args):
        if "state" in args:
            raise RuntimeError()
        return real(self, directory, args=args)

    monkeypatch.setattr(ocp.Checkpointer, "restore", restore_failing)
    with pytest.raises(ValueError, match=r"is corrupted or truncated: RuntimeError: $"):
        restore(tmp_path, make_state())


def test_keep_applies_to_the_versions_already_there(tmp_path):
    """orbax's retention sees every version on disk, and numbers on from the newest."""
    for seed in range(3):
        save(tmp_path, make_state(seed), keep=3)
    assert complete_versions(tmp_path) == ["000001", "000002", "000003"]
    assert save(tmp_path, make_state(3), keep=1) == tmp_path / "000004"
    assert complete_versions(tmp_path) == ["000004"]
    assert save(tmp_path, make_state(4), keep=2) == tmp_path / "000005"
    assert complete_versions(tmp_path) == ["000004", "000005"]
    assert_identical(restore(tmp_path, make_state()), make_state(4))


def _threads_left(before: set, timeout: float = 10.0) -> set:
    """Threads started since ``before`` still alive after up to ``timeout`` seconds: orbax
    shuts the worker threads of its event loops down without joining them, so they may
    take a moment to end after a save returns."""
    deadline = time.monotonic() + timeout
    while (left := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def test_a_failed_save_publishes_nothing_and_leaves_no_thread(tmp_path, monkeypatch):
    """A save failing inside orbax closes its manager; its temporary directory is ignored
    by restore and cleared by the next save."""
    from bnjax._src import checkpoint

    save(tmp_path, make_state(0))
    threads = set(threading.enumerate())

    def disk_full(root):
        raise OSError(28, "No space left on device", str(root))

    monkeypatch.setattr(checkpoint, "fsync_tree", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path, make_state(1))
    monkeypatch.undo()
    assert not _threads_left(threads)
    assert complete_versions(tmp_path) == ["000001"]
    assert any(tmp_path.glob(f"*{TMP}*"))
    assert_identical(restore(tmp_path, make_state()), make_state(0))
    save(tmp_path, make_state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001", "000002"]
    assert not _threads_left(threads)


def test_a_checkpoint_of_bnjax_0_0_is_refused_by_name(tmp_path):
    """bnjax 0.0 wrote ``000001/state`` beside ``000001/manifest.json``; that layout is no
    longer restored, and the error says so instead of calling it corrupted. A save into
    such a directory goes on from its newest number and retires the old versions."""
    (tmp_path / "000001" / "state").mkdir(parents=True)
    (tmp_path / "000001" / "manifest.json").write_text("{}")
    for path in (tmp_path, tmp_path / "000001"):
        with pytest.raises(ValueError, match="has the layout of bnjax 0.0") as info:
            restore(path, make_state())
        assert "corrupted" not in str(info.value)
    assert save(tmp_path, make_state(1), keep=1) == tmp_path / "000002"  # numbering goes on
    assert complete_versions(tmp_path) == ["000002"]
    assert_identical(restore(tmp_path, make_state()), make_state(1))
