"""Checkpoints: exact round trips, and clear errors for corrupt or mismatched ones."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import checkpoint as ckpt_lib


def _variables(width: int = 4) -> dict:
  rng = np.random.default_rng(0)
  return {
      "params": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, width)), jnp.float32)},
                 "head": {"kernel": jnp.asarray(rng.normal(size=(width, 3)), jnp.float32),
                          "bias": jnp.zeros((3,), jnp.bfloat16)}},
      "batch_stats": {"bn": {"mean": np.arange(width, dtype=np.float32),
                             "var": np.ones(width, np.float32)}},
  }


def _state(width: int = 4) -> dict:
  v = _variables(width)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  opt_state = tx.init(v["params"])
  # A step so that the momentum and the step count are not their initial values.
  grads = jax.tree.map(jnp.ones_like, v["params"])
  _, opt_state = tx.update(grads, opt_state, v["params"])
  return {"params": v["params"], "batch_stats": v["batch_stats"], "opt_state": opt_state}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Reading damaged array files, orbax leaves failed background reads behind that report
# errors ("Event loop is closed") from another thread a little later, into whichever test then
# runs. Those restores therefore run in a child process, which reports what they raised.
_RESTORE_IN_CHILD = """
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax.numpy as jnp
from experiments import checkpoint as ckpt_lib
for kind, path, like in json.loads(sys.argv[1]):
  like = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in like.items()}
  try:
    if kind == "train":
      with ckpt_lib.TrainCheckpointer(path) as ckpt:
        ckpt.restore(like)
    else:
      ckpt_lib.load_variables(path)
    result = ["no error", ""]
  except Exception as e:
    result = [type(e).__name__, str(e)]
  sys.stdout.write(json.dumps(result) + "\\n")
"""


def _restore_in_child(jobs: list) -> list:
  """[(error type, message)] of restoring each (kind, path, {leaf: (shape, dtype)}) job."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _RESTORE_IN_CHILD, json.dumps(jobs)], cwd=root,
                       capture_output=True, text=True, timeout=120, check=True)
  return [tuple(json.loads(line)) for line in out.stdout.splitlines()]


def _write(path: str, content: bytes) -> None:
  with open(path, "wb") as f:
    f.write(content)


def test_save_and_load_variables_round_trip(tmp_path):
  path = tmp_path / "model"
  v = _variables()
  ckpt_lib.save_variables(path, v, {"classes": [1, 2], "width": 4})
  loaded, meta = ckpt_lib.load_variables(path, like=v)
  _assert_trees_equal(loaded, v)
  assert meta == {"classes": [1, 2], "width": 4}
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
  # Shapes only (jax.eval_shape) are enough to check against.
  ckpt_lib.load_variables(path, like=jax.eval_shape(lambda: v))


def test_save_variables_does_not_overwrite_by_accident(tmp_path):
  path = tmp_path / "model"
  ckpt_lib.save_variables(path, _variables(), {"version": 1})
  with pytest.raises(FileExistsError, match="overwrite=True"):
    ckpt_lib.save_variables(path, _variables(), {"version": 2})
  ckpt_lib.save_variables(path, _variables(6), {"version": 3}, overwrite=True)
  loaded, meta = ckpt_lib.load_variables(path)
  assert meta == {"version": 3}
  assert loaded["params"]["conv"]["kernel"].shape == (3, 3, 2, 6)


def test_load_variables_of_another_architecture_lists_both_sides(tmp_path):
  path = tmp_path / "model"
  ckpt_lib.save_variables(path, _variables(4))
  like = _variables(6)
  like["params"]["extra"] = {"kernel": jnp.zeros((2,))}
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    ckpt_lib.load_variables(path, like=like)
  message = str(info.value)
  assert "params/conv/kernel: saved float32[3, 3, 2, 4], expected float32[3, 3, 2, 6]" in message
  assert "batch_stats/bn/mean: saved float32[4], expected float32[6]" in message
  assert "params/extra/kernel: saved missing, expected float32[2]" in message
  assert "params/head/bias" not in message  # leaves that match are not listed


def test_load_variables_missing(tmp_path):
  with pytest.raises(FileNotFoundError):
    ckpt_lib.load_variables(tmp_path / "nothing")


def test_train_checkpointer_round_trips_optimiser_state(tmp_path):
  state = _state()
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_epoch() is None
    ckpt.save(1, state, {"epoch": 1, "config": {"lr": 0.1, "sizes": (1, 2)}})
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_epoch() == 1
    target = jax.tree.map(jnp.zeros_like, state)
    restored, record = ckpt.restore(target, expected={"config": {"lr": 0.1, "sizes": (1, 2)}})
  _assert_trees_equal(restored, state)
  assert record["epoch"] == 1


def _largest_file(directory) -> int:
  return max(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(directory) for f in files)


def test_checkpoints_are_written_in_files_of_bounded_size(monkeypatch, tmp_path):
  """A state several times the target size is split over several data files, none over twice
  the target (a file is closed once it passes the target, and each chunk is at most the
  target), and restores exactly; the target is patched small so that the test writes little."""
  monkeypatch.setattr(ckpt_lib, "DATA_FILE_BYTES", 64 << 10)
  state = {"w": np.random.default_rng(0).normal(size=(4, 96, 128)).astype(np.float32),  # 192 KiB
           "b": np.arange(5, dtype=np.int32)}
  with ckpt_lib.TrainCheckpointer(tmp_path / "train") as ckpt:
    ckpt.save(1, state, {"epoch": 1})
  ckpt_lib.save_variables(tmp_path / "model", state)
  for where in ("train", "model"):
    data = glob.glob(str(tmp_path / where / "**" / "ocdbt.process_0" / "d" / "*"), recursive=True)
    assert len(data) >= 2, where
    assert _largest_file(tmp_path / where) <= 2 * (64 << 10), where
  with ckpt_lib.TrainCheckpointer(tmp_path / "train") as ckpt:
    restored, _ = ckpt.restore(jax.tree.map(np.zeros_like, state))
  _assert_trees_equal(restored, state)
  _assert_trees_equal(ckpt_lib.load_variables(tmp_path / "model")[0], state)


def test_checkpoints_written_in_one_data_file_still_restore(tmp_path):
  """Checkpoints saved before the data files were bounded (orbax's standard handler)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = _state()
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path, options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "record": ocp.JsonCheckpointHandler()}) as m:
    m.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(
        {"epoch": 3, "arrays": ckpt_lib._shapes_to_json(ckpt_lib._shapes(state))})))
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    restored, record = ckpt.restore(jax.tree.map(jnp.zeros_like, state))
  _assert_trees_equal(restored, state)
  assert record["epoch"] == 3


_SAVE_REPLICATED_IN_CHILD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from experiments import checkpoint as ckpt_lib
mesh = Mesh(np.array(jax.devices()), ("data",))
state = {"w": jax.device_put(np.arange(6, dtype=np.float32).reshape(2, 3),
                             NamedSharding(mesh, PartitionSpec()))}
with ckpt_lib.TrainCheckpointer(sys.argv[1]) as ckpt:
  ckpt.save(1, state, {"epoch": 1})
"""


def test_state_saved_on_several_devices_restores_on_one(tmp_path):
  """Training data-parallel on 4 devices, resuming or reading the result on 1."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", _SAVE_REPLICATED_IN_CHILD, str(tmp_path)], cwd=root,
                 capture_output=True, text=True, timeout=120, check=True)
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore({"w": np.zeros((2, 3), np.float32)})
  np.testing.assert_array_equal(restored["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert restored["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_train_checkpointer_keeps_only_the_latest(tmp_path):
  with ckpt_lib.TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    for epoch in (1, 2, 3):
      ckpt.save(epoch, _state(), {"epoch": epoch})
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_epoch() == 3
  assert sorted(d for d in os.listdir(tmp_path) if d.isdigit()) == ["3"]


def test_train_checkpointer_errors(tmp_path):
  with ckpt_lib.TrainCheckpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError, match="No checkpoint in"):
      ckpt.restore(_state())
  with ckpt_lib.TrainCheckpointer(tmp_path / "run") as ckpt:
    ckpt.save(2, _state(), {"config": {"lr": 0.1}, "classes": [0, 1]})
  with ckpt_lib.TrainCheckpointer(tmp_path / "run") as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError) as info:
      ckpt.restore(_state(), expected={"config": {"lr": 0.2}, "classes": [0, 1]})
    assert "config: saved {'lr': 0.1}, now {'lr': 0.2}" in str(info.value)
    assert "classes" not in str(info.value)  # equal entries are not listed
    with pytest.raises(ckpt_lib.CheckpointError) as info:
      ckpt.restore(_state(width=5))
    assert "opt_state/1/0/trace/conv/kernel: saved float32[3, 3, 2, 4], expected " \
        "float32[3, 3, 2, 5]" in str(info.value)



def test_a_setting_added_after_the_checkpoint_reads_as_its_default(tmp_path):
  with ckpt_lib.TrainCheckpointer(tmp_path / "run") as ckpt:
    ckpt.save(2, _state(), {"config": {"lr": 0.1}, "classes": [0, 1]})
  with ckpt_lib.TrainCheckpointer(tmp_path / "run") as ckpt:
    defaults = {"config": {"lr": 0.3, "optimizer": "sgd"}}
    _, record = ckpt.restore(_state(), expected={"config": {"lr": 0.1, "optimizer": "sgd"}},
                             defaults=defaults)
    assert record["classes"] == [0, 1]
    with pytest.raises(ckpt_lib.CheckpointError) as info:  # the default is not what it asks
      ckpt.restore(_state(), expected={"config": {"lr": 0.1, "optimizer": "adamw"}},
                   defaults=defaults)
    assert "saved {'lr': 0.1, 'optimizer': 'sgd'}, now {'lr': 0.1, 'optimizer': 'adamw'}" \
        in str(info.value)
    with pytest.raises(ckpt_lib.CheckpointError):  # a saved value is never replaced
      ckpt.restore(_state(), expected={"config": {"lr": 0.3, "optimizer": "sgd"}},
                   defaults=defaults)

def _damage(step, kind: str) -> None:
  if kind == "data":  # truncated array files
    for f in glob.glob(str(step / "**" / "d" / "*"), recursive=True):
      _write(f, b"garbage")
  elif kind == "manifest":
    for f in glob.glob(str(step / "**" / "manifest.ocdbt"), recursive=True):
      os.remove(f)
  elif kind == "metadata":
    _write(str(step / "state" / "_METADATA"), b"{truncated")
  elif kind == "record":
    for f in glob.glob(str(step / "record" / "*")):
      os.remove(f)
    os.rmdir(step / "record")


@pytest.mark.parametrize("damage", ["metadata", "record"])
def test_damaged_train_checkpoint_is_a_clear_error(tmp_path, damage):
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(), {"epoch": 1})
  _damage(tmp_path / "1", damage)
  with ckpt_lib.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(ckpt_lib.CheckpointError) as info:
      ckpt.restore(_state())
  assert str(tmp_path / "1") in str(info.value)
  assert "corrupt or incomplete" in str(info.value)


def test_damaged_array_files_are_a_clear_error(tmp_path):
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
  like = {k: [list(v.shape), str(v.dtype)] for k, v in params.items()}
  jobs = []
  for damage in ("data", "manifest"):
    with ckpt_lib.TrainCheckpointer(tmp_path / damage) as ckpt:
      ckpt.save(1, params, {"epoch": 1})
    _damage(tmp_path / damage / "1", damage)
    jobs.append(("train", str(tmp_path / damage), like))
    ckpt_lib.save_variables(tmp_path / f"model_{damage}", params)
    _damage(tmp_path / f"model_{damage}", damage)
    jobs.append(("variables", str(tmp_path / f"model_{damage}"), like))
  results = _restore_in_child(jobs)
  assert len(results) == len(jobs)
  for (kind, path, _), (error, message) in zip(jobs, results):
    assert error == "CheckpointError", (kind, path, error, message)
    assert path in message and "corrupt or incomplete" in message
