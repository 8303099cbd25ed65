"""Training: the recipe's schedule and losses, and exact resumption from checkpoints."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import checkpoint as ckpt_lib
from experiments import data as data_lib
from experiments import train as train_lib

CLASSES = (1, 3, 5, 7)


class TinyCNN(nn.Module):
  """Conv + BatchNorm + ReLU, then a linear head on the flattened features: params and
  batch_stats, fast to compile."""

  features: int = 4
  num_outputs: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(self.num_outputs, name="head")(x)


@pytest.fixture(scope="module")
def digits() -> data_lib.Dataset:
  train, _ = data_lib.load_digits()
  return train.subset(CLASSES).limit_per_class(60)


CONFIG = train_lib.TrainConfig(epochs=2, batch_size=40, learning_rate=0.05, warmup_epochs=0.5,
                               seed=3)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _crash_at(monkeypatch, crash_epoch: int):
  """Makes the data pipeline raise when ``crash_epoch`` starts: a run killed mid-training."""
  real = data_lib.train_batches

  def batches(ds, batch_size, *, seed, epoch, augmentation=True):
    if epoch == crash_epoch:
      raise KeyboardInterrupt(f"simulated crash at epoch {epoch}")
    return real(ds, batch_size, seed=seed, epoch=epoch, augmentation=augmentation)

  monkeypatch.setattr(train_lib.data_lib, "train_batches", batches)


def test_resumed_run_is_bit_identical(digits, tmp_path, monkeypatch):
  model = TinyCNN()
  straight = train_lib.train(model, digits, CLASSES, CONFIG, progress=False)

  ckdir = tmp_path / "run"
  with monkeypatch.context() as m:
    _crash_at(m, crash_epoch=1)
    with pytest.raises(KeyboardInterrupt):
      train_lib.train(model, digits, CLASSES, CONFIG, progress=False, checkpoint_dir=ckdir)
  with ckpt_lib.TrainCheckpointer(ckdir) as c:
    assert c.latest_epoch() == 1
  resumed = train_lib.train(model, digits, CLASSES, CONFIG, progress=False,
                            checkpoint_dir=ckdir)
  with ckpt_lib.TrainCheckpointer(ckdir) as c:
    assert c.latest_epoch() == 2
  assert set(resumed) == {"params", "batch_stats"}
  _assert_trees_equal(resumed, straight)

  # A finished run is restored without touching the data again.
  _crash_at(monkeypatch, crash_epoch=0)
  again = train_lib.train(model, digits, CLASSES, CONFIG, progress=False, checkpoint_dir=ckdir)
  _assert_trees_equal(again, straight)


def test_resume_refuses_another_run(digits, tmp_path):
  ckdir = tmp_path / "run"
  config = dataclasses.replace(CONFIG, epochs=1)
  train_lib.train(TinyCNN(), digits, CLASSES, config, progress=False, checkpoint_dir=ckdir)
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    train_lib.train(TinyCNN(), digits, CLASSES, dataclasses.replace(config, learning_rate=0.2),
                    progress=False, checkpoint_dir=ckdir)
  assert "belongs to another run" in str(info.value)
  assert "'learning_rate': 0.05" in str(info.value) and "'learning_rate': 0.2" in str(info.value)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"classes: saved \[1, 3, 5, 7\], now "):
    train_lib.train(TinyCNN(num_outputs=2), digits, (1, 3), config, progress=False,
                    checkpoint_dir=ckdir)


def test_resume_refuses_another_architecture(digits, tmp_path):
  ckdir = tmp_path / "run"
  config = dataclasses.replace(CONFIG, epochs=1)
  train_lib.train(TinyCNN(), digits, CLASSES, config, progress=False, checkpoint_dir=ckdir)
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    train_lib.train(TinyCNN(features=6), digits, CLASSES, config, progress=False,
                    checkpoint_dir=ckdir)
  message = str(info.value)
  assert "params/conv/kernel: saved float32[3, 3, 1, 4], expected float32[3, 3, 1, 6]" in message
  assert "batch_stats/bn/mean: saved float32[4], expected float32[6]" in message


def test_training_learns_the_task(digits):
  # No augmentation: crops shifted by up to 4 pixels and flips destroy 8x8 digits.
  config = dataclasses.replace(CONFIG, epochs=6, learning_rate=0.1, augmentation=False)
  variables = train_lib.train(TinyCNN(features=8), digits, CLASSES, config, progress=False)
  outputs, y = train_lib.predict(TinyCNN(features=8).apply, variables,
                                 data_lib.EvalBatches(digits, 100))
  accuracy = (outputs.argmax(-1) == train_lib.local_labels(y, CLASSES)).mean()
  assert accuracy > 0.9  # chance: 0.25


def test_models_of_one_recipe_share_their_compiled_step(digits):
  model = TinyCNN(features=5)
  before = train_lib._recipe_step.cache_info()  # pylint: disable=protected-access
  a = train_lib.train(model, digits, CLASSES, CONFIG, progress=False)
  b = train_lib.train(model, digits, CLASSES, dataclasses.replace(CONFIG, seed=4),
                      progress=False)
  after = train_lib._recipe_step.cache_info()  # pylint: disable=protected-access
  assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
  # The seed still matters: it is an input of the run, not of the compiled step.
  assert not np.array_equal(a["params"]["head"]["kernel"], b["params"]["head"]["kernel"])


def test_clip_head_trains_against_class_embeddings(digits):
  emb = data_lib.random_class_embeddings(len(CLASSES), 16, seed=0)
  variables = train_lib.train(TinyCNN(num_outputs=16), digits, CLASSES,
                              dataclasses.replace(CONFIG, epochs=1), class_embeddings=emb,
                              progress=False)
  assert variables["params"]["head"]["kernel"].shape == (8 * 8 * 4, 16)
  logits = train_lib.class_logits(jnp.ones((2, 16)), jnp.asarray(emb), 20.0)
  assert logits.shape == (2, len(CLASSES))
  assert float(jnp.abs(logits).max()) <= 20.0 + 1e-4


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_zero(kind):
  config = train_lib.TrainConfig(epochs=10, learning_rate=0.4, warmup_epochs=2, schedule=kind)
  sched = train_lib.schedule(config, steps_per_epoch=10)
  lrs = np.array([float(sched(i)) for i in range(101)])
  assert lrs[0] == 0.0
  assert lrs[20] == pytest.approx(0.4)
  assert np.all(np.diff(lrs[:21]) > 0) and np.all(np.diff(lrs[20:]) <= 1e-7)
  assert lrs[100] == pytest.approx(0.0, abs=1e-6)
  if kind == "linear":
    assert lrs[60] == pytest.approx(0.2)


def test_label_smoothing_changes_the_loss_as_optax_does():
  model = TinyCNN()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8, 8, 1)), jnp.float32)
  y = jnp.arange(8) % 4
  variables = model.init(jax.random.key(0), x)
  tx = optax.sgd(0.0)
  losses = {}
  for smoothing in (0.0, 0.1):
    step = train_lib.make_train_step(model, tx, None, 20.0, label_smoothing=smoothing)
    *_, loss = step(variables["params"], variables["batch_stats"],
                    tx.init(variables["params"]), x, y)
    losses[smoothing] = float(loss)
  logits = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  want = optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(y, 4), 0.1)).mean()
  assert losses[0.1] == pytest.approx(float(want), rel=1e-5)
  assert losses[0.1] != losses[0.0]


def test_adamw_optimizer_is_optax_adamw_on_the_schedule():
  config = train_lib.TrainConfig(epochs=2, learning_rate=1e-3, weight_decay=0.05,
                                 optimizer="adamw")
  params = {"w": jnp.asarray([1.0, -2.0, 3.0])}
  grads = {"w": jnp.asarray([0.5, 0.1, -0.3])}
  tx = train_lib.make_optimizer(config, steps_per_epoch=5)
  want = optax.adamw(train_lib.schedule(config, 5), weight_decay=0.05)
  state, want_state = tx.init(params), want.init(params)
  for _ in range(3):
    upd, state = tx.update(grads, state, params)
    want_upd, want_state = want.update(grads, want_state, params)
    np.testing.assert_array_equal(upd["w"], want_upd["w"])
  assert float(jnp.abs(upd["w"]).max()) > 0


@pytest.mark.parametrize("field,value,match", [
    ("schedule", "step", "schedule must be one of"),
    ("label_smoothing", 1.0, "label_smoothing"),
    ("epochs", 0, "epochs >= 1"),
    ("optimizer", "adam", "optimizer must be one of"),
])
def test_train_config_rejects_bad_values(field, value, match):
  with pytest.raises(ValueError, match=match):
    train_lib.TrainConfig(**{field: value})


def _data_parallel_worker() -> dict:
  """Run with 8 CPU devices: the same training on all 8 and on one, and a checkpoint written
  by the 8-device run restored by a one-device one."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  train, _ = data_lib.load_digits()
  task = train.subset(CLASSES).limit_per_class(60)
  one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  with tempfile.TemporaryDirectory() as ckdir:
    eight = train_lib.train(TinyCNN(), task, CLASSES, CONFIG, progress=False,
                            checkpoint_dir=ckdir)
    restored = train_lib.train(TinyCNN(), task, CLASSES, CONFIG, progress=False,
                               checkpoint_dir=ckdir, mesh=one)
  single = train_lib.train(TinyCNN(), task, CLASSES, CONFIG, progress=False, mesh=one)
  try:
    train_lib.train(TinyCNN(), task, CLASSES, dataclasses.replace(CONFIG, batch_size=36),
                    progress=False)
    uneven = ""
  except ValueError as e:
    uneven = str(e)
  leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]  # noqa: E731
  return {
      "devices": jax.device_count(),
      "out_devices": sorted({len(a.sharding.device_set) for a in jax.tree.leaves(eight)}),
      # Absolute: the conv bias before BatchNorm gets no gradient but rounding (~1e-8).
      "max_abs_diff": max(float(np.abs(a - b).max())
                          for a, b in zip(leaves(eight), leaves(single))),
      "restored_equal": all(np.array_equal(a, b)
                            for a, b in zip(leaves(eight), leaves(restored))),
      "differs_from_init": not np.allclose(
          leaves(single)[0], leaves(TinyCNN().init(jax.random.key(3), task.x[:2]))[0]),
      "uneven": uneven,
  }


@pytest.fixture(scope="module")
def data_parallel() -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=8").strip())
  proc = subprocess.run([sys.executable, "-W", "error", os.path.abspath(__file__)], cwd=root,
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the 8-device worker: ~20 s
def test_data_parallel_training_matches_one_device(data_parallel):
  assert data_parallel["devices"] == 8
  assert data_parallel["max_abs_diff"] < 1e-5  # parameters and statistics are O(1)
  assert data_parallel["differs_from_init"]


@pytest.mark.slow  # the 8-device worker: ~20 s
def test_data_parallel_training_returns_single_device_arrays(data_parallel):
  assert data_parallel["out_devices"] == [1]


@pytest.mark.slow  # the 8-device worker: ~20 s
def test_checkpoint_of_a_data_parallel_run_restores_on_one_device(data_parallel):
  assert data_parallel["restored_equal"]


@pytest.mark.slow  # the 8-device worker: ~20 s
def test_data_parallel_training_refuses_an_uneven_batch(data_parallel):
  assert "batch_size=36 is not a multiple" in data_parallel["uneven"]
  assert "8 devices" in data_parallel["uneven"]


if __name__ == "__main__":
  print(json.dumps(_data_parallel_worker()))
