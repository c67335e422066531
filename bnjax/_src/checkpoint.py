"""Crash-safe checkpoints of any pytree (a ``TrainState``) with orbax-checkpoint.

A checkpoint directory holds numbered versions, each complete or absent::

    path/000001/state/          orbax-checkpoint's files
    path/000001/manifest.json   every leaf's path, shape, dtype and SHA-256
    path/000002/...

:func:`save` writes a new version into a hidden temporary directory, fsyncs every file
and directory, and only then renames it to the next number (an atomic rename on one
file system): a process killed at any moment leaves either the old versions alone or the
new version complete. Older versions beyond ``keep`` are then removed, newest kept.
:func:`restore` reads the highest version, checks its manifest against ``like`` (first
mismatching leaf named), and verifies every restored leaf against its checksum, so a
corrupted or truncated checkpoint is refused, never loaded as garbage. One process
writes a given ``path`` at a time; others may restore meanwhile (a version the writer
retires during a read is read again from the newest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np

from bnjax._src import extras
from bnjax._src import validation as v

FORMAT = "bnjax-checkpoint-1"
MANIFEST = "manifest.json"
STATE = "state"


def leaf_name(key_path) -> str:
    """A dotted name for a pytree key path, e.g. ``params.conv.scale`` or ``opt_state.0``."""
    parts = []
    for key in key_path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts) or "<root>"


def _describe(tree) -> list[dict]:
    """Path, shape and dtype of every leaf of ``tree``, in flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        {
            "path": leaf_name(p),
            "key": jax.tree_util.keystr(p),  # tells {"a.b": x} from {"a": {"b": x}}
            "shape": list(np.shape(x)),
            "dtype": str(_dtype(x)),
        }
        for p, x in leaves
    ]


def _dtype(x) -> np.dtype:
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def _digest(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsyncs every file and directory under ``root`` (``root`` included)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def versions(path) -> list[Path]:
    """The complete versions in a checkpoint directory, oldest first."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name))


def save(path, state, *, keep: int = 2) -> Path:
    """Saves ``state`` as a new version of the checkpoint directory ``path``.

    Args:
      path: the checkpoint directory (created if missing).
      state: any pytree of arrays, e.g. a ``TrainState``.
      keep: how many versions to keep, the new one included (at least 1).

    Returns:
      The directory of the new version.

    Raises:
      ValueError: ``keep`` is less than 1.
      TypeError: ``keep`` is not an int.
    """
    v.check_int("keep", keep, low=1, what="versions kept, the one just written included")
    ocp = _orbax()

    leaves = _describe(state)
    for entry in leaves:
        if 0 in entry["shape"]:
            raise ValueError(
                f"state leaf {entry['path']!r} has shape {tuple(entry['shape'])}, with no "
                "element; orbax-checkpoint cannot store an empty array. Leave it out of the "
                "saved pytree (or give it one element)"
            )
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    existing = versions(path)
    number = int(existing[-1].name) + 1 if existing else 1
    tmp = path / f".tmp-{number:06d}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / STATE, state)
            checkpointer.wait_until_finished()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written version
        raise
    for entry, leaf in zip(leaves, jax.tree.leaves(state), strict=True):
        entry["sha256"] = _digest(leaf)
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "leaves": leaves}, indent=1))
    _fsync_tree(tmp)
    final = path / f"{number:06d}"
    os.rename(tmp, final)  # the commit point: the version appears complete or not at all
    _fsync_dir(path)
    for old in versions(path)[:-keep]:
        _discard(old)
    return final


def _discard(directory: Path) -> None:
    """Removes a directory, first renaming it so a partial removal is never a version."""
    trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex}")
    os.rename(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Removes what an interrupted save left behind (never a complete version)."""
    for p in path.iterdir():
        if p.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(p, ignore_errors=True)


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
        (the first mismatching leaf is named), or the checkpoint is corrupted or
        truncated (a missing or unreadable file, or a leaf whose checksum differs).
    """
    path = Path(path).absolute()
    for _ in range(_RETRIES):
        version = _pick_version(path)
        try:
            return _restore_version(version, like)
        except (OSError, ValueError):
            # A writer with a small ``keep`` may retire this version while it is read: that
            # is not damage. Read the newest version again.
            if version == path or version.exists():
                raise
    return _restore_version(_pick_version(path), like)


_RETRIES = 4


def _restore_version(version: Path, like):
    manifest = _read_manifest(version)
    _compare(manifest["leaves"], _describe(like), version)
    restored = _read_arrays(version, like)
    for entry, leaf in zip(manifest["leaves"], jax.tree.leaves(restored), strict=True):
        if _digest(leaf) != entry["sha256"]:
            raise ValueError(
                f"checkpoint {version} is corrupted: leaf {entry['path']!r} does not match the "
                "checksum recorded when it was saved; refusing to load it"
            )
    return restored


def _pick_version(path: Path) -> Path:
    if (path / MANIFEST).is_file() or (path / STATE).is_dir():
        return path
    found = versions(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {os.fspath(path)!r}")
    return found[-1]


def _read_manifest(version: Path) -> dict:
    try:
        manifest = json.loads((version / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"checkpoint {version} is corrupted or incomplete: cannot read {MANIFEST} ({e})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"checkpoint {version}: {MANIFEST} is not a {FORMAT} manifest")
    leaves = manifest.get("leaves")
    if not isinstance(leaves, list):
        raise ValueError(f"checkpoint {version} is corrupted: {MANIFEST} has no list of leaves")
    for i, entry in enumerate(leaves):
        missing = [k for k in _ENTRY_FIELDS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(
                f"checkpoint {version} is corrupted: {MANIFEST} entry {i} lacks {missing}; "
                f"expected the fields {list(_ENTRY_FIELDS)} of every leaf"
            )
    return manifest


_ENTRY_FIELDS = ("path", "shape", "dtype", "sha256")


def _compare(saved: list[dict], wanted: list[dict], version: Path) -> None:
    """Raises ValueError naming the first leaf where the checkpoint and ``like`` differ."""
    for i in range(max(len(saved), len(wanted))):
        have = saved[i] if i < len(saved) else None
        want = wanted[i] if i < len(wanted) else None
        if have is not None and want is not None and have["path"] != want["path"]:
            raise ValueError(
                f"checkpoint {version} does not match like: leaf {i} is {have['path']!r} in the "
                f"checkpoint but {want['path']!r} in like (another structure)"
            )
        if have is not None and want is not None and have.get("key", want["key"]) != want["key"]:
            raise ValueError(
                f"checkpoint {version} does not match like: leaf {i} is {have['key']} in the "
                f"checkpoint but {want['key']} in like (another structure; the checkpoint "
                "itself is intact)"
            )
        if have is None or want is None:
            name, where = (want, "like") if have is None else (have, "the checkpoint")
            raise ValueError(
                f"checkpoint {version} does not match like: leaf {name['path']!r} exists only "
                f"in {where} ({len(saved)} leaves saved, {len(wanted)} in like)"
            )
        for field, show in (("shape", tuple), ("dtype", str)):
            if have[field] != want[field]:
                raise ValueError(
                    f"checkpoint {version} does not match like: leaf {have['path']!r} has "
                    f"{field} {show(have[field])} in the checkpoint but {show(want[field])} in like"
                )


def _read_arrays(version: Path, like):
    ocp = _orbax()

    def target(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), _dtype(x), sharding=sharding)

    treedef = jax.tree.structure(like)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(version / STATE, jax.tree.map(target, like))
    except Exception as e:  # orbax and tensorstore raise many kinds on damaged files
        detail = (str(e).splitlines() or [""])[0][:300]
        raise ValueError(
            f"checkpoint {version} is corrupted or truncated: {type(e).__name__}: {detail}"
        ) from e
    return jax.tree.unflatten(treedef, jax.tree.leaves(restored))


def _orbax():
    """orbax.checkpoint, imported on first use (it is slow to import)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise extras.missing("bnjax.training.save/restore", "training", e) from e
    return ocp
