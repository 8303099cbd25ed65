"""Training source models with optax: the paper's recipe (SGD with momentum 0.9, weight decay
5e-4, linear warm-up then cosine or linear decay), CLIP-style or cross-entropy heads.

``train(..., checkpoint_dir=...)`` saves the training state after every epoch and resumes an
interrupted run after its last completed epoch, with the same result, bit for bit, as a run
that was never interrupted (batch order depends only on (seed, epoch); see
``experiments.checkpoint``).

Training is data-parallel over every local device (or a given ``jax.sharding.Mesh``): each
batch is split over the mesh's "data" axis, the model replicated, and XLA sums the gradients
and the BatchNorm statistics over the devices, so a step computes what it computes on one
device, up to rounding. On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` makes
8 devices of the cores, each working on a slice of the batch (see docs/design.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh

from . import checkpoint as checkpoint_lib
from . import data as data_lib
from zipjax._src import sharding as sharding_lib

SCHEDULES = ("cosine", "linear")
#: The values of ``TrainConfig.optimizer``.
OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How one source model trains.

  Attributes:
    epochs: passes over the task's training images.
    batch_size: images per step; the last partial batch of an epoch is dropped.
    learning_rate: the peak learning rate, reached after the warm-up.
    momentum: SGD (Nesterov) momentum.
    weight_decay: SGD: L2 weight decay, added to the gradients; AdamW: its decoupled weight
      decay.
    warmup_epochs: linear warm-up from 0 to ``learning_rate``.
    schedule: the decay after the warm-up to 0 at the end: "cosine" or "linear".
    label_smoothing: cross-entropy label smoothing (0: none).
    augmentation: random crop (zero padding 4) and horizontal flip.
    logit_scale: CLIP-style heads: logits = scale * cosine similarity.
    seed: initialisation and batch order.
    optimizer: "sgd" (Nesterov momentum: the paper's CNNs) or "adamw" (b1 0.9, b2 0.999:
      transformers).
  """

  epochs: int = 20
  batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_epochs: float = 1.0
  schedule: str = "cosine"
  label_smoothing: float = 0.0
  augmentation: bool = True
  logit_scale: float = 20.0
  seed: int = 0
  optimizer: str = "sgd"

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got "
                       f"{self.optimizer!r}.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got "
                       f"{self.schedule!r}.")
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"TrainConfig needs epochs >= 1 and batch_size >= 1, got {self.epochs} "
                       f"and {self.batch_size}.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"TrainConfig.label_smoothing must lie in [0, 1), got "
                       f"{self.label_smoothing}.")


def class_logits(outputs: jax.Array, class_embeddings: jax.Array | None,
                 logit_scale: float) -> jax.Array:
  """Logits over a task's classes: scaled cosine similarity to the class embeddings for a
  CLIP-style head, or the outputs themselves for a cross-entropy head (embeddings None)."""
  if class_embeddings is None:
    return outputs
  feats = outputs / (jnp.linalg.norm(outputs, axis=-1, keepdims=True) + 1e-12)
  return logit_scale * feats @ class_embeddings.T


def schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  total = max(1, config.epochs * steps_per_epoch)
  warmup = max(1, min(total - 1, int(config.warmup_epochs * steps_per_epoch)))
  if config.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup),
         optax.linear_schedule(config.learning_rate, 0.0, max(1, total - warmup))], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  if config.optimizer == "adamw":
    return optax.adamw(schedule(config, steps_per_epoch), weight_decay=config.weight_decay)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule(config, steps_per_epoch), momentum=config.momentum,
                               nesterov=True))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    class_embeddings: jax.Array | None, logit_scale: float, *,
                    label_smoothing: float = 0.0) -> Callable:
  """A jitted step (params, batch_stats, opt_state, x, local labels) -> (..., loss)."""
  core = _train_step(model, tx, logit_scale, label_smoothing)
  return lambda params, batch_stats, opt_state, x, y: core(params, batch_stats, opt_state, x,
                                                           y, class_embeddings)


def _train_step(model: nn.Module, tx: optax.GradientTransformation, logit_scale: float,
                label_smoothing: float) -> Callable:
  """The jitted step with the class embeddings as an argument (None: cross-entropy head)."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, class_embeddings):
    def loss_fn(p):
      out, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
      logits = class_logits(out, class_embeddings, logit_scale)
      if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
      else:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), new_stats, opt_state, loss

  return step


@functools.lru_cache(maxsize=16)
def _recipe_step(model: nn.Module, recipe: TrainConfig, steps_per_epoch: int
                 ) -> tuple[optax.GradientTransformation, Callable]:
  """(optimizer, jitted step) of a recipe, shared by every model trained with it: the
  recipe without its seed, so the source models of an experiment compile their step once."""
  tx = make_optimizer(recipe, steps_per_epoch)
  return tx, _train_step(model, tx, recipe.logit_scale, recipe.label_smoothing)


def local_labels(y: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Global class indices -> positions in ``classes``."""
  lookup = np.full(int(max(classes)) + 1, -1, np.int32)
  lookup[np.asarray(classes)] = np.arange(len(classes))
  out = lookup[y]
  if (out < 0).any():
    raise ValueError("Labels outside the task's classes; subset the dataset first.")
  return out


#: How a record written before a ``TrainConfig`` field existed reads: with the field's default,
#: which keeps the behaviour from before the field.
_RECORD_DEFAULTS = {"config": {f.name: f.default for f in dataclasses.fields(TrainConfig)}}


def run_record(task: data_lib.Dataset, classes: Sequence[int], config: TrainConfig,
               class_embeddings: np.ndarray | None) -> dict[str, Any]:
  """What identifies a training run in its checkpoints: resuming needs all of it unchanged."""
  return {
      "config": dataclasses.asdict(config),
      "classes": [int(c) for c in classes],
      "num_images": len(task),
      "image_shape": list(task.x.shape[1:]),
      "head": "ce" if class_embeddings is None else "clip",
      "class_embeddings_shape": (None if class_embeddings is None
                                 else list(np.shape(class_embeddings))),
  }


def train(model: nn.Module, ds: data_lib.Dataset, classes: Sequence[int], config: TrainConfig,
          *, class_embeddings: np.ndarray | None = None, progress: bool = True,
          desc: str = "train", checkpoint_dir: str | os.PathLike | None = None,
          mesh: Mesh | None = None) -> dict[str, Any]:
  """Trains ``model`` on the images of ``classes`` in ``ds``; returns its variables.

  Args:
    model: a flax module called as ``model.apply(variables, x, train=...)``.
    ds: the training set; only the images of ``classes`` are used.
    classes: the task's classes (global indices); label i of the head is ``classes[i]``.
    config: the training recipe.
    class_embeddings: (len(classes), D): a CLIP-style head; None: a cross-entropy head with
      len(classes) outputs.
    progress: show a progress bar.
    desc: the progress bar's label.
    checkpoint_dir: save the training state there after every epoch, and resume from the
      latest checkpoint there if any (a finished run returns its variables without training).
      A checkpoint of another run (config, classes, data size, head) or architecture raises
      ``experiments.checkpoint.CheckpointError``.
    mesh: the devices to train on, data-parallel over its "data" axis (or all its axes);
      None: all local devices. The batch size must be a multiple of the number of shards.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (no "batch_stats" for models without any), on
    one device.
  """
  task = ds.subset(classes)
  if len(task) < config.batch_size:
    raise ValueError(f"Only {len(task)} training images for batch size {config.batch_size}.")
  mesh = sharding_lib.resolve_mesh(mesh)
  if mesh is not None and config.batch_size % sharding_lib.num_shards(mesh):
    raise ValueError(
        f"Data-parallel training splits each batch over {sharding_lib.num_shards(mesh)} "
        f"devices: TrainConfig.batch_size={config.batch_size} is not a multiple of that. "
        f"Choose a multiple, or pass mesh= over fewer devices.")
  place = (lambda tree: tree) if mesh is None else (  # noqa: E731
      lambda tree: sharding_lib.place_batch(tree, mesh))
  steps_per_epoch = len(task) // config.batch_size
  tx, core = _recipe_step(model, dataclasses.replace(config, seed=0), steps_per_epoch)
  emb = None if class_embeddings is None else jnp.asarray(class_embeddings)
  x0 = task.normalise(task.x[:2])
  variables = model.init(jax.random.key(config.seed), x0)
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  state["opt_state"] = tx.init(state["params"])
  step = lambda p, b, o, x, y: core(p, b, o, x, y, emb)  # noqa: E731
  record = run_record(task, classes, config, class_embeddings)
  loss = float("nan")
  start_epoch = 0
  with contextlib.ExitStack() as stack:
    ckpt = None
    if checkpoint_dir is not None:
      ckpt = stack.enter_context(checkpoint_lib.TrainCheckpointer(checkpoint_dir))
      if ckpt.latest_epoch() is not None:
        state, saved = ckpt.restore(state, expected=record, defaults=_RECORD_DEFAULTS)
        start_epoch, loss = int(saved["epoch"]), float(saved["loss"])
    if mesh is not None:
      state = sharding_lib.replicate(state, mesh)
    params, batch_stats, opt_state = state["params"], state["batch_stats"], state["opt_state"]
    if start_epoch < config.epochs:
      # Compile before the progress bar starts, so that its rate and ETA count steps only:
      # one step on the first images, its result discarded.
      n = config.batch_size
      jax.block_until_ready(step(params, batch_stats, opt_state, place(task.normalise(
          task.x[:n])), place(local_labels(task.y[:n], classes))))
    bar = stack.enter_context(tqdm.tqdm(
        total=config.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=desc,
        disable=not progress, leave=False))
    for epoch in range(start_epoch, config.epochs):
      for x, y in data_lib.train_batches(task, config.batch_size, seed=config.seed, epoch=epoch,
                                         augmentation=config.augmentation):
        params, batch_stats, opt_state, loss = step(
            params, batch_stats, opt_state, place(x), place(local_labels(y, classes)))
        bar.update()
      bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
      if ckpt is not None:
        ckpt.save(epoch + 1, {"params": params, "batch_stats": batch_stats,
                              "opt_state": opt_state},
                  {**record, "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                   "loss": float(loss)})
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"Training diverged (loss {float(loss)}); lower the learning rate.")
  out = {"params": params}
  if batch_stats:
    out["batch_stats"] = batch_stats
  return sharding_lib.to_local(out)


@functools.partial(jax.jit, static_argnums=0)
def _predict(apply_fn, variables, x):
  return apply_fn(variables, x)


def predict(apply_fn: Callable, variables: Any, batches) -> tuple[np.ndarray, np.ndarray]:
  """Model outputs and labels over re-iterable (x, y) batches."""
  outs, ys = [], []
  for x, y in batches:
    outs.append(np.asarray(_predict(apply_fn, variables, x)))
    ys.append(np.asarray(y))
  return np.concatenate(outs), np.concatenate(ys)
