"""Checkpoints with orbax: per-epoch training state that resumes exactly, and finished models.

- :class:`TrainCheckpointer` keeps the training state (params, batch_stats, opt_state) and a
  JSON record (completed epochs, optimiser steps, the training config, the task's classes, ...)
  after every epoch, in ``directory/<epoch>/``. Writes are atomic: a run killed mid-save leaves
  the previous epoch's checkpoint intact. ``experiments.train.train(..., checkpoint_dir=...)``
  uses it to resume an interrupted run after its last completed epoch, bit for bit the run it
  would have been.
- :func:`save_variables` / :func:`load_variables`: a finished model's variables and metadata.

A checkpoint that cannot be used — unreadable files, another architecture (different leaves or
shapes), another run (different config or classes) — raises :class:`CheckpointError` (a
``ValueError``) that lists the saved and the expected side.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


_ARRAYS = "arrays"  # the record entry with every saved leaf's shape and dtype

# Target size of each data file a checkpoint writes. orbax packs all arrays into one OCDBT data
# file by default (2.2 MiB for a ResNet-20x1 with its optimiser state); with this target a file
# is closed once it passes 1 MiB and arrays are written in chunks of at most 1 MiB, so no file
# exceeds 2 MiB and trained checkpoints stay committable where a repository limits file size.
DATA_FILE_BYTES = 1 << 20


class CheckpointError(ValueError):
  """A checkpoint that is corrupt, or that belongs to another architecture or run."""


def _path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf path: (shape, dtype)}; NamedTuple fields and dict keys give the same path."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): (tuple(int(d) for d in x.shape), str(np.dtype(x.dtype)))
          for p, x in leaves}


def _shapes_to_json(shapes: Mapping[str, tuple]) -> dict[str, list]:
  return {k: [list(shape), dtype] for k, (shape, dtype) in shapes.items()}


def _shapes_from_json(saved: Any, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
  try:
    return {k: (tuple(int(d) for d in shape), str(dtype)) for k, (shape, dtype) in saved.items()}
  except (AttributeError, TypeError, ValueError) as e:
    raise CheckpointError(f"{where} has an unreadable record of its arrays ({e}); it is "
                          "corrupt or incomplete. Delete it to start over.") from e


def _describe(entry) -> str:
  return "missing" if entry is None else f"{entry[1]}{list(entry[0])}"


def check_tree_matches(saved: Mapping[str, tuple], expected: Mapping[str, tuple],
                       where: str, *, limit: int = 20) -> None:
  """Raises CheckpointError listing every leaf whose shape/dtype differs or that one side lacks.

  ``saved`` and ``expected`` map leaf paths to (shape, dtype), as :func:`_shapes` returns.
  """
  bad = [k for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
  if not bad:
    return
  lines = [f"  {k}: saved {_describe(saved.get(k))}, expected {_describe(expected.get(k))}"
           for k in bad[:limit]]
  if len(bad) > limit:
    lines.append(f"  ... and {len(bad) - limit} more")
  raise CheckpointError(
      f"{where} does not match the model: {len(bad)} of {len(set(saved) | set(expected))} "
      "leaves differ (another architecture, width or number of outputs?):\n" + "\n".join(lines)
      + f"\nUse the model it was saved from, or delete {where} to start over.")


def _with_defaults(saved: Any, defaults: Any) -> Any:
  """``saved`` with every key it lacks (at any depth of nested dicts) taken from ``defaults``."""
  if not isinstance(saved, dict) or not isinstance(defaults, Mapping):
    return saved
  return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def _check_metadata(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str,
                    defaults: Mapping[str, Any] | None = None) -> None:
  """Raises CheckpointError listing every key of ``expected`` whose saved value differs; a
  key the saved record lacks (a setting added after it was written) reads as its value in
  ``defaults``."""
  expected = json.loads(json.dumps(dict(expected)))  # tuples -> lists, as saved
  if defaults is not None:
    saved = _with_defaults(dict(saved), json.loads(json.dumps(dict(defaults))))
  bad = [k for k in sorted(expected) if saved.get(k) != expected[k]]
  if bad:
    lines = [f"  {k}: saved {saved.get(k)!r}, now {expected[k]!r}" for k in bad]
    raise CheckpointError(f"{where} belongs to another run:\n" + "\n".join(lines)
                          + f"\nRun with the saved settings, or delete {where} to start over.")


def _corrupt(where: str, err: BaseException) -> CheckpointError:
  detail = str(err)
  if len(detail) > 400:
    detail = detail[:400] + " ..."
  return CheckpointError(f"{where} cannot be read ({type(err).__name__}: {detail}); it is "
                         "corrupt or incomplete. Delete it to start over.")


class TrainCheckpointer:
  """Per-epoch training checkpoints in ``directory`` (an orbax ``CheckpointManager``).

  Each checkpoint holds ``state`` (a pytree: params, batch_stats, opt_state) under the number
  of completed epochs, and a JSON ``record``. Use as a context manager, or call ``close()``:
  saves run in the background and ``close`` waits for them.

  Args:
    directory: the run's checkpoint folder (created if missing).
    max_to_keep: how many of the latest checkpoints to keep.
    async_save: write checkpoints in a background thread while training goes on.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "record": ocp.JsonCheckpointHandler()})

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def latest_epoch(self) -> int | None:
    """The number of completed epochs of the latest checkpoint, or None if there is none."""
    self._manager.reload()
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, record: Mapping[str, Any]) -> None:
    """Saves ``state`` and ``record`` (JSON-serialisable) as the checkpoint of ``epoch``.

    The record also keeps every leaf's shape and dtype (under ``"arrays"``), so that a
    mismatch is found, and reported leaf by leaf, before any array is read.
    """
    record = {**record, _ARRAYS: _shapes_to_json(_shapes(state))}
    self._manager.save(epoch, args=ocp.args.Composite(
        state=_save_args(state), record=ocp.args.JsonSave(record)))

  def restore(self, target: Any, *, expected: Mapping[str, Any] | None = None,
              defaults: Mapping[str, Any] | None = None,
              epoch: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The state and record of ``epoch`` (default: the latest), shaped like ``target``.

    Args:
      target: a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``s); the
        restored state has its structure, shapes, dtypes and shardings (numpy arrays: the
        first device), whichever devices the state was saved from.
      expected: record entries that must equal the saved ones (the run's config, classes...).
      defaults: what a record written before a setting existed is read as having, nested like
        ``expected`` (e.g. ``{"config": {"optimizer": "sgd"}}``): a new setting whose default
        keeps the old behaviour does not orphan the checkpoints written before it.
      epoch: which checkpoint; None: the latest.

    Raises:
      CheckpointError: no checkpoint, an unreadable one, a different tree or shapes than
        ``target``, or a record that differs from ``expected``; the message lists both sides.
    """
    if epoch is None:
      epoch = self.latest_epoch()
      if epoch is None:
        raise CheckpointError(f"No checkpoint in {self.directory}.")
    where = os.path.join(self.directory, str(epoch))
    try:
      record = self._manager.restore(epoch, args=ocp.args.Composite(
          record=ocp.args.JsonRestore()))["record"]
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupt(where, e) from e
    if not isinstance(record, dict) or _ARRAYS not in record:
      raise CheckpointError(f"{where} is incomplete (no record of its arrays); it is corrupt or "
                            "incomplete. Delete it to start over.")
    if expected is not None:
      _check_metadata(record, expected, where, defaults)
    check_tree_matches(_shapes_from_json(record.pop(_ARRAYS), where), _shapes(target), where)
    # Each array comes back where the target's is (one device for host arrays), whatever
    # devices it was saved from: a state trained data-parallel on 8 devices restores on 1.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device), target)
    try:
      state = self._manager.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))[
                  "state"]
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupt(where, e) from e
    return state, dict(record)


def _save_args(tree: Any) -> ocp.args.PyTreeSave:
  """Saves ``tree`` in data files of at most about :data:`DATA_FILE_BYTES` each."""
  return ocp.args.PyTreeSave(tree, ocdbt_target_data_file_size=DATA_FILE_BYTES)


def _variables_checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      variables=ocp.PyTreeCheckpointHandler(), metadata=ocp.JsonCheckpointHandler(),
      arrays=ocp.JsonCheckpointHandler()))


def save_variables(path: str | os.PathLike, variables: Any,
                   metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> None:
  """Saves a finished model's ``variables`` and JSON-serialisable ``metadata`` to ``path``.

  ``path`` becomes a folder, written atomically. An existing ``path`` is an error unless
  ``overwrite``.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  with _variables_checkpointer() as ckpt:
    ckpt.save(path, force=overwrite, args=ocp.args.Composite(
        variables=_save_args(variables),
        metadata=ocp.args.JsonSave(dict(metadata or {})),
        arrays=ocp.args.JsonSave(_shapes_to_json(_shapes(variables)))))


def load_variables(path: str | os.PathLike, *,
                   like: Any | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, metadata) saved by :func:`save_variables`; arrays as jax arrays.

  Args:
    path: the folder :func:`save_variables` wrote.
    like: optional variables of the model the caller expects (e.g. ``model.init(...)`` or
      ``jax.eval_shape`` of it): a different tree or shapes raise :class:`CheckpointError`
      listing both sides, instead of failing later inside ``model.apply``.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No saved variables at {path}.")
  try:
    with _variables_checkpointer() as ckpt:
      if like is not None:
        arrays = ckpt.restore(path, args=ocp.args.Composite(
            arrays=ocp.args.JsonRestore()))["arrays"]
        check_tree_matches(_shapes_from_json(arrays, path), _shapes(like), path)
      # Each array comes back as a host array (then on the default device), whatever
      # devices it was saved from.
      saved = ckpt.metadata(path).item_metadata["variables"].tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
      out = ckpt.restore(path, args=ocp.args.Composite(
          variables=ocp.args.PyTreeRestore(restore_args=restore_args),
          metadata=ocp.args.JsonRestore()))
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _corrupt(path, e) from e
  return jax.tree.map(jnp.asarray, dict(out["variables"])), dict(out["metadata"] or {})
