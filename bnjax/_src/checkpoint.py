"""Crash-safe checkpoints of any pytree (a ``TrainState``) on orbax-checkpoint.

A checkpoint directory is one of orbax's ``CheckpointManager``: a numbered step per
version, each holding two items::

    path/000001/state/      the arrays, in orbax-checkpoint's format
    path/000001/manifest/   every leaf's path, shape, dtype and SHA-256 (JSON)
    path/000002/...

orbax writes a version into a temporary directory and renames it into place, removes
the versions beyond ``keep`` (newest kept), and clears what an interrupted save left
behind. orbax fsyncs only the array data; bnjax fsyncs every file and directory of the
version before that rename and the directory after it, so a process killed (or a machine
losing power) at any moment leaves either the old versions alone or the new version
complete. :func:`restore` reads the newest version, checks its manifest against ``like``
(first mismatching leaf named), and verifies every restored leaf against its checksum,
so a corrupted or truncated checkpoint is refused, never loaded as garbage. One process
writes a given ``path`` at a time; others may restore meanwhile (a version the writer
retires during a read is read again from the newest).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import jax
import numpy as np

from bnjax._src import extras
from bnjax._src import validation as v

FORMAT = "bnjax-checkpoint-1"
STATE = "state"
MANIFEST = "manifest"
DIGITS = 6  # version directories are 000001, 000002, ...
RETRIES = 4  # reads of a version retired meanwhile, before the last read
_ENTRY_FIELDS = ("path", "key", "shape", "dtype", "sha256")


def _describe(tree) -> list[dict]:
    """Path, shape and dtype of every leaf of ``tree``, in flattening order; the path is
    dotted, e.g. ``params.conv.scale`` or ``opt_state.0``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        {
            "path": jax.tree_util.keystr(p, simple=True, separator=".") or "<root>",
            "key": jax.tree_util.keystr(p),  # tells {"a.b": x} from {"a": {"b": x}}
            "shape": list(np.shape(x)),
            "dtype": str(_dtype(x)),
        }
        for p, x in leaves
    ]


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _digest(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _fsync(*paths) -> None:
    """fsyncs files and directories."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every file and directory under ``root`` (``root`` included)."""
    for dirpath, _, filenames in os.walk(root):
        _fsync(dirpath, *(os.path.join(dirpath, name) for name in filenames))


@functools.cache
def _durable_rename(ocp):
    """orbax's atomic rename of a version (and of each item in it) into place, with fsyncs.

    Before the rename every file and directory of the new version is fsynced; after it,
    the commit marker orbax writes just before renaming, and the parent directory.
    """

    class DurableRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):  # blocking calls: a save is synchronous anyway
            fsync_tree(Path(self.get()))
            await super().finalize()  # writes orbax's commit marker, then renames
            fsync_tree(Path(self.get_final()))
            _fsync(Path(self.get_final()).parent)

    return DurableRename


def _manager(ocp, root: Path, keep: int | None = None):
    """A ``CheckpointManager`` on ``root``: a writer keeping ``keep`` versions, or a reader.

    A reader never saves, so it writes nothing (orbax's ``read_only`` would only add two
    logged warnings per manager).
    """
    writer = keep is not None
    options = ocp.CheckpointManagerOptions(
        step_format_fixed_length=DIGITS,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep) if writer else None,
        create=writer,
        cleanup_tmp_directories=writer,
        enable_async_checkpointing=False,  # save returns with the version on disk
        temporary_path_class=_durable_rename(ocp),
    )
    return ocp.CheckpointManager(root, options=options)


def save(path, state, *, keep: int = 2) -> Path:
    """Saves ``state`` as a new version of the checkpoint directory ``path``.

    Args:
      path: the checkpoint directory (created if missing).
      state: any pytree of arrays, e.g. a ``TrainState``.
      keep: how many versions to keep, the new one included (at least 1).

    Returns:
      The directory of the new version, e.g. ``path/000003``.

    Raises:
      ValueError: ``keep`` is less than 1, or a leaf of ``state`` has no element.
      TypeError: ``keep`` is not an int.
      OSError: writing failed; no version is published, and the next save clears what
        this one wrote.
    """
    v.check_int("keep", keep, low=1, what="versions kept, the one just written included")
    ocp = _orbax()
    leaves = _describe(state)
    for entry, leaf in zip(leaves, jax.tree.leaves(state), strict=True):
        if 0 in entry["shape"]:
            raise ValueError(
                f"state leaf {entry['path']!r} has shape {tuple(entry['shape'])}, with no "
                "element; orbax-checkpoint cannot store an empty array. Leave it out of the "
                "saved pytree (or give it one element)"
            )
        entry["sha256"] = _digest(leaf)
    path = Path(path).absolute()
    manifest = {"format": FORMAT, "leaves": leaves}
    # Synchronous: save returns with the version in place. Closed even when the save
    # fails, so no orbax thread outlives it.
    with _manager(ocp, path, keep=keep) as manager:
        step = (manager.latest_step() or 0) + 1
        items = {STATE: ocp.args.StandardSave(state), MANIFEST: ocp.args.JsonSave(manifest)}
        manager.save(step, args=ocp.args.Composite(**items))
    return path / f"{step:0{DIGITS}d}"


def restore(path, like):
    """Restores the newest version of a checkpoint, with the structure of ``like``.

    Args:
      path: a checkpoint directory written by :func:`save`, or one version in it.
      like: a pytree with the structure, shapes and dtypes expected (e.g. a freshly
        created ``TrainState``); arrays are placed with the shardings of its leaves.

    Returns:
      A pytree of the structure of ``like`` holding the saved values, bit for bit.

    Raises:
      FileNotFoundError: ``path`` holds no complete checkpoint.
      ValueError: the checkpoint's structure, a shape or a dtype differs from ``like``
        (the first mismatching leaf is named), the checkpoint is corrupted or truncated
        (a missing or unreadable file, or a leaf whose checksum differs), or it has the
        layout of bnjax 0.0.
    """
    path = Path(path).absolute()
    for retry in range(RETRIES + 1):
        version = _pick_version(path)
        try:
            return _restore_version(version, like)
        except (OSError, ValueError):
            # A writer with a small ``keep`` may retire this version while it is read: that
            # is not damage. Read the newest version again, up to RETRIES times.
            if retry == RETRIES or version == path or version.exists():
                raise


def _pick_version(path: Path) -> Path:
    if (path / STATE).is_dir() or (path / MANIFEST).is_dir():
        return path
    with _manager(_orbax(), path) as manager:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {os.fspath(path)!r}")
    return path / f"{step:0{DIGITS}d}"


def _restore_version(version: Path, like):
    leaves = _read_manifest(version)
    _compare(leaves, _describe(like), version)
    restored = read_arrays(version, like)
    for entry, leaf in zip(leaves, jax.tree.leaves(restored), strict=True):
        if _digest(leaf) != entry["sha256"]:
            raise ValueError(
                f"checkpoint {version} is corrupted: leaf {entry['path']!r} does not match the "
                "checksum recorded when it was saved; refusing to load it"
            )
    return restored


def _read_item(version: Path, item: str, args, damage: str):
    """Reads one item of a version (a directory of any name) with orbax.

    Any error orbax raises becomes a ValueError saying the version is ``damage``.
    """
    ocp = _orbax()
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            return checkpointer.restore(version, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # orbax and tensorstore raise many kinds on damaged files
        detail = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(f"checkpoint {version} is {damage}: {type(e).__name__}: {detail}") from e


def _read_manifest(version: Path) -> list[dict]:
    """The leaves listed in a version's manifest, each with all of ``_ENTRY_FIELDS``."""
    if (version / "manifest.json").is_file():
        raise ValueError(
            f"checkpoint {version} has the layout of bnjax 0.0 (a manifest.json beside state/), "
            "which this bnjax no longer restores; restore it with bnjax 0.0"
        )
    damage = f"corrupted or incomplete: cannot read its {MANIFEST}"
    manifest = _read_item(version, MANIFEST, _orbax().args.JsonRestore(), damage)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"checkpoint {version}: its {MANIFEST} is not a {FORMAT} manifest")
    leaves = manifest.get("leaves")
    if not isinstance(leaves, list):
        raise ValueError(f"checkpoint {version} is corrupted: its {MANIFEST} has no leaf list")
    for i, entry in enumerate(leaves):
        missing = [k for k in _ENTRY_FIELDS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(
                f"checkpoint {version} is corrupted: {MANIFEST} entry {i} lacks {missing}; "
                f"expected the fields {list(_ENTRY_FIELDS)} of every leaf"
            )
    return leaves


def _compare(saved: list[dict], wanted: list[dict], version: Path) -> None:
    """Raises ValueError naming the first leaf where the checkpoint and ``like`` differ."""
    differ = f"checkpoint {version} does not match like:"
    for i, (have, want) in enumerate(zip(saved, wanted, strict=False)):  # lengths: below
        for field in ("path", "key"):  # {"a.b": x} and {"a": {"b": x}} differ by key only
            if have[field] != want[field]:
                raise ValueError(
                    f"{differ} leaf {i} is {have[field]!r} in the checkpoint but "
                    f"{want[field]!r} in like (another structure; the checkpoint is intact)"
                )
        for field, show in (("shape", tuple), ("dtype", str)):
            if have[field] != want[field]:
                raise ValueError(
                    f"{differ} leaf {have['path']!r} has {field} {show(have[field])} in the "
                    f"checkpoint but {show(want[field])} in like"
                )
    if len(saved) != len(wanted):
        n = min(len(saved), len(wanted))
        only, where = (wanted[n], "like") if n == len(saved) else (saved[n], "the checkpoint")
        raise ValueError(
            f"{differ} leaf {only['path']!r} exists only in {where} "
            f"({len(saved)} leaves saved, {len(wanted)} in like)"
        )


def read_arrays(version: Path, like):
    """The arrays of a version, in the structure of ``like`` (orbax restores into it), with
    its leaves' shapes, dtypes and shardings."""

    def target(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=sharding)

    args = _orbax().args.StandardRestore(jax.tree.map(target, like))
    return _read_item(version, STATE, args, "corrupted or truncated")


def _orbax():
    """orbax.checkpoint, imported on first use (it is slow to import)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise extras.missing("bnjax.training.save/restore", "training", e) from e
    return ocp
