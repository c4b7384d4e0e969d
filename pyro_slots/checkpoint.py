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
==================  ==============================================================================
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import warnings

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "CheckpointError",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "pyro_slots.checkpoint/1"
REQUIRED_KEYS = ("format", "step", "config", "model", "inner", "objective", "svi", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted, unsafe or not in :data:`FORMAT`.

    The message is one line that names the file.
    """


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically.

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
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Only ``torch.load(path, weights_only=True)`` is used: a file carrying a pickled object that
    is not a tensor or a primitive (e.g. a payload calling ``os.system``) is refused without
    running it.

    :param path: a ``*.pt`` file.
    :returns: the payload dict.
    :raises CheckpointError: one line naming ``path``, when the file is missing, truncated,
        corrupted, unsafe, or lacks the keys of :data:`REQUIRED_KEYS`.
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
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks the entries {missing}")
    return payload


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
