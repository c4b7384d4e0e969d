"""Training checkpoints: written atomically, read with ``torch.load(..., weights_only=True)`` only.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts — nothing that needs
arbitrary unpickling — so :func:`load_checkpoint` never executes code from the file. It holds
what an exact resume needs (see :func:`pyro_slots.cli.train.train`):

==================  ==============================================================================
key                 content
==================  ==============================================================================
``format``          :data:`FORMAT` (a string naming this layout and its version)
``step``            number of outer updates done
``config``          the resolved training configuration (a dict of primitives)
``model``           ``model.state_dict()``
``inner``           ``inner.state_dict()``
``objective``       ``objective.state_dict()``
``init``            ``init.state_dict()`` of a learned slot initializer, or ``None``
``svi``             :meth:`pyro_slots.NestedSVI.state_dict` (optimizer states, slot-init RNG)
``rng``             :func:`rng_state`: torch, numpy and Python ``random`` global states, and the
                    data stream's position
``sha256``          :func:`payload_digest` of every other entry, added by :func:`save_checkpoint`
                    and verified by :func:`load_checkpoint`
==================  ==============================================================================

``torch.load`` does not verify the CRCs of the zip records it reads, so a flipped byte inside a
weight would load silently; the digest covers every tensor's bytes, dtype and shape and every
other value, so any change to what the file holds is refused. The file stays a plain
``torch.save`` archive (``torch.load(path, weights_only=True)`` reads it).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import tempfile
import warnings

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "CHECKSUM_KEY",
    "REQUIRED_KEYS",
    "CheckpointError",
    "load_checkpoint",
    "payload_digest",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checksum",
    "write_atomically",
]

FORMAT = "pyro_slots.checkpoint/2"
REQUIRED_KEYS = ("format", "step", "config", "model", "inner", "objective", "svi", "rng")
#: The payload entry holding the SHA-256 of the others (hex), written by :func:`save_checkpoint`.
CHECKSUM_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted, unsafe or not in :data:`FORMAT`.

    The message is one line that names the file.
    """


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _feed(h, value) -> None:
    """Feed a canonical, type-tagged encoding of ``value`` into the hash ``h``."""
    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)}:".encode())
        for key, item in items:
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, list | tuple):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, bool) or value is None:
        h.update(f"B{value}".encode())
    elif isinstance(value, int):
        h.update(f"I{value}:".encode())
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode()
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(value, bytes):
        h.update(f"Y{len(value)}:".encode() + value)
    elif isinstance(value, torch.dtype | torch.device | torch.Size):
        h.update(f"O{value}".encode())
    else:
        raise TypeError(f"payload: cannot checksum a {type(value).__name__}")


def payload_digest(payload: dict) -> str:
    """SHA-256 (hex) of every entry of ``payload`` but :data:`CHECKSUM_KEY`.

    A canonical encoding of the values (each tensor's dtype, shape and bytes, numbers, strings,
    nested dicts with sorted keys and lists), so the digest of a loaded payload equals the
    digest of the payload that was saved exactly when every value is the same.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` and its SHA-256 (entry :data:`CHECKSUM_KEY`) to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed and ``fsync``-ed, and
    the file is then renamed over ``path`` with :func:`os.replace` (atomic on POSIX and
    Windows), so a reader — or a resumed run after a crash — sees either the old checkpoint or
    the new one, never half of one. The directory is ``fsync``-ed too where the platform allows.

    :param path: destination ``*.pt`` file.
    :param dict payload: the checkpoint (see the module docstring); it must be loadable with
        ``weights_only=True``, which is checked before anything is written.
    :raises CheckpointError: if the payload holds objects that a weights-only load would refuse.
    """
    path = os.fspath(path)
    if not isinstance(payload, dict):
        raise TypeError(f"payload: expected a dict, got {type(payload).__name__}")
    try:
        payload = {**payload, CHECKSUM_KEY: payload_digest(payload)}
    except TypeError as error:
        raise CheckpointError(
            f"{path}: payload cannot be loaded with weights_only=True ({error}); store only "
            "tensors, numbers, strings, lists and dicts"
        ) from None
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any refusal means the payload is unsafe
        raise CheckpointError(
            f"{path}: payload cannot be loaded with weights_only=True ({_first_line(error)}); "
            "store only tensors, numbers, strings, lists and dicts"
        ) from None
    write_atomically(path, data)


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half.

    The bytes go to a temporary file in the same directory, are flushed and ``fsync``-ed, and
    the file is renamed over ``path`` with :func:`os.replace` (atomic on POSIX and Windows);
    the directory is ``fsync``-ed too where the platform allows. Every file the library writes
    for a run (checkpoints, configuration, logs rewritten on resume, test reports, CSV tables)
    goes through here.

    :param data: bytes, or text (written as UTF-8).
    """
    path = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        # mkstemp makes the file 0600: give it the mode a plain open() would (the file's own
        # when it is rewritten, else 0666 less the umask), or the run is owner-only.
        if hasattr(os, "fchmod"):
            try:
                mode = os.stat(path).st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Only ``torch.load(path, weights_only=True)`` is used: a file carrying a pickled object that
    is not a tensor or a primitive (e.g. a payload calling ``os.system``) is refused without
    running it. The SHA-256 saved with the payload is checked: a file whose bytes changed after
    it was written (a flipped bit inside a weight) is refused.

    :param path: a ``*.pt`` file.
    :returns: the payload dict.
    :raises CheckpointError: one line naming ``path``, when the file is missing, truncated,
        corrupted (checksum mismatch), unsafe, or lacks the keys of :data:`REQUIRED_KEYS`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            # torch warns about legacy pickle files before refusing them; the refusal is reported.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        raise CheckpointError(
            f"{path}: not a readable pyro-slots checkpoint (truncated, corrupted or unsafe): "
            f"{_first_line(error)}"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: expected a checkpoint dict, found a {type(payload).__name__}"
        )
    if payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {payload.get('format')!r}, expected {FORMAT!r}"
        )
    missing = [key for key in (*REQUIRED_KEYS, CHECKSUM_KEY) if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the entries {missing}")
    verify_checksum(payload, path)
    return payload


def verify_checksum(payload: dict, path: str | os.PathLike) -> None:
    """Check the SHA-256 saved in ``payload`` (:data:`CHECKSUM_KEY`) against its content.

    :raises CheckpointError: one line naming ``path`` on a mismatch or a missing checksum.
    """
    saved = payload.get(CHECKSUM_KEY)
    if not isinstance(saved, str):
        raise CheckpointError(f"{os.fspath(path)}: checkpoint has no SHA-256 checksum")
    try:
        actual = payload_digest(payload)
    except TypeError as error:
        raise CheckpointError(f"{os.fspath(path)}: {error}") from None
    if actual != saved:
        raise CheckpointError(
            f"{os.fspath(path)}: checksum mismatch (the file changed after it was written: "
            f"SHA-256 {actual[:12]}... instead of {saved[:12]}...); refusing a corrupted "
            "checkpoint"
        )


def rng_state(data_position: int | None = None) -> dict:
    """The global random states, as a weights-only-loadable dict.

    :param int data_position: position of the data stream (the next training step); the CLI's
        streams draw batch ``s`` from ``(seed, s)`` alone, so this is their whole state.
    """
    # The legacy global state is what code calling np.random.* draws from: save it as it is.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "data_position": data_position,
    }


def set_rng_state(state: dict) -> None:
    """Restore the global random states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
