"""Checkpoints of the official ZipIt! code (PyTorch) as zipjax variables.

The official repository's CIFAR models are a ResNet-20 (``resnet20x{w}``: 3x3 convs padded
by 1, a 3x3 conv + BatchNorm shortcut where a stage starts, a linear head) and a VGG without
BatchNorm (``vgg11_w{w}``). Their state dicts convert to the variables of
``resnet20(w, outputs, padding="pytorch")`` and ``vgg11(w, outputs, batchnorm=False)``, which
compute the same functions.

A state dict is any mapping of the official names to arrays (numpy arrays, or torch tensors:
anything ``numpy.asarray`` takes). :func:`load_torch_checkpoint` reads one from a ``.pt``
file; it needs torch (``pip install "zipjax[torch]"``) and loads tensors only
(``weights_only=True``: reading a checkpoint runs no code from it).

Example::

  state = zipjax.models.load_torch_checkpoint("resnet20x4_cifar5_a.pt")
  variables = zipjax.models.from_official_resnet20(state)
  model, spec = zipjax.models.resnet20(4, 512, padding="pytorch")
  outputs = model.apply(variables, images_nhwc)
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from zipjax._src.errors import SpecError

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED = ("num_batches_tracked",)


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The state dict in a PyTorch ``.pt`` file as {name: numpy array}.

  Loaded with ``torch.load(..., weights_only=True, map_location="cpu")``: tensors only, no
  code run from the file. A ``module.`` prefix (a DataParallel checkpoint) is dropped, and a
  checkpoint that holds its weights under ``"state_dict"`` is unwrapped.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading .pt checkpoints needs torch: pip install 'zipjax[torch]' (or "
                      "convert the state dict to numpy arrays where torch is installed and "
                      "pass that mapping to the converter).") from e
  state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(
      state["state_dict"], Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise ValueError(f"{os.fspath(path)} holds a {type(state).__name__}, not a state dict.")
  return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in state.items()}


def _arrays(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in state.items():
    if k.endswith(_IGNORED):
      continue
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu().numpy()
    out[k.removeprefix("module.")] = np.asarray(v, np.float32)
  return out


def _conv(w: np.ndarray) -> np.ndarray:
  """(out, in, kh, kw) -> flax's (kh, kw, in, out)."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _take(state: dict, used: set, name: str, shape: tuple | None = None) -> np.ndarray:
  if name not in state:
    raise SpecError(f"The state dict has no {name!r}; is it an official ZipIt! checkpoint of "
                    "this architecture?")
  used.add(name)
  value = state[name]
  if shape is not None and value.shape != shape:
    raise SpecError(f"{name!r} has shape {value.shape}, expected {shape}.")
  return value


def _batchnorm(state: dict, used: set, prefix: str, width: int) -> tuple[dict, dict]:
  params, stats = {}, {}
  for torch_name, ours in _BN.items():
    value = _take(state, used, f"{prefix}.{torch_name}", (width,))
    (stats if ours in ("mean", "var") else params)[ours] = value
  return params, stats


def _linear(state: dict, used: set, name: str, width: int) -> dict:
  """A torch Linear (weight (out, in), bias (out,)) reading ``width`` features, as flax's."""
  weight = _take(state, used, f"{name}.weight")
  if weight.ndim != 2 or weight.shape[1] != width:
    raise SpecError(f"'{name}.weight' has shape {weight.shape}, expected (outputs, {width}).")
  return {"kernel": np.ascontiguousarray(weight.T),
          "bias": _take(state, used, f"{name}.bias", (weight.shape[0],))}


def _check_all_used(state: dict, used: set, what: str) -> None:
  extra = sorted(set(state) - used)
  if extra:
    raise SpecError(f"The state dict has entries that {what} does not: {extra[:8]}"
                    + (" ..." if len(extra) > 8 else "") + ".")


def from_official_resnet20(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The variables of ``resnet20(w, outputs, padding="pytorch")`` from an official ResNet-20
  state dict (names ``conv1.weight``, ``layer2.0.shortcut.0.weight``, ``linear.weight``, ...).

  The width w = ``conv1.weight``'s output channels / 16 and the outputs (512 for CLIP-style
  heads) come from the shapes. BatchNorm running variances are kept as stored (PyTorch's
  are unbiased estimates; the model uses them as its variances, as PyTorch does).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` with the zoo's names.

  Raises:
    SpecError: a missing or unexpected entry, or a shape that does not fit.
  """
  state, used = _arrays(state_dict), set()
  stem = _take(state, used, "conv1.weight")
  w0 = stem.shape[0]
  widths = [w0, 2 * w0, 4 * w0]
  params = {"stem_conv": {"kernel": _conv(_take(state, used, "conv1.weight", (w0, 3, 3, 3)))}}
  stats = {}
  params["stem_bn"], stats["stem_bn"] = _batchnorm(state, used, "bn1", w0)
  prev = w0
  for s, w in enumerate(widths, start=1):
    for b in range(3):
      src, dst = f"layer{s}.{b}", f"stage{s}_block{b}"
      block_params, block_stats = {}, {}
      block_params["conv1"] = {"kernel": _conv(_take(state, used, f"{src}.conv1.weight",
                                                     (w, prev, 3, 3)))}
      block_params["bn1"], block_stats["bn1"] = _batchnorm(state, used, f"{src}.bn1", w)
      block_params["conv2"] = {"kernel": _conv(_take(state, used, f"{src}.conv2.weight",
                                                     (w, w, 3, 3)))}
      block_params["bn2"], block_stats["bn2"] = _batchnorm(state, used, f"{src}.bn2", w)
      if prev != w:
        block_params["shortcut_conv"] = {"kernel": _conv(_take(
            state, used, f"{src}.shortcut.0.weight", (w, prev, 3, 3)))}
        block_params["shortcut_bn"], block_stats["shortcut_bn"] = _batchnorm(
            state, used, f"{src}.shortcut.1", w)
      params[dst], stats[dst] = block_params, block_stats
      prev = w
  params["head"] = _linear(state, used, "linear", prev)
  _check_all_used(state, used, f"ResNet-20 x{w0 // 16}")
  return {"params": params, "batch_stats": stats}


def from_official_vgg(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The variables of ``vgg11(w, outputs, batchnorm=False)`` (or ``vgg16``) from an
  official VGG state dict (``features.{i}.weight`` / ``.bias`` for the convs in order,
  ``classifier.weight`` / ``.bias``).

  Returns:
    ``{"params": ...}`` with the zoo's names (``conv0`` ..., ``head``).

  Raises:
    SpecError: a missing or unexpected entry, or a shape that does not fit.
  """
  state, used = _arrays(state_dict), set()
  found = sorted({int(m.group(1)) for k in state
                  if (m := re.fullmatch(r"features\.(\d+)\.weight", k))})
  if not found:
    raise SpecError("The state dict has no 'features.{i}.weight' entries; is it an official "
                    "ZipIt! VGG checkpoint?")
  params, prev = {}, 3
  for i, index in enumerate(found):
    kernel = _take(state, used, f"features.{index}.weight")
    if kernel.ndim != 4 or kernel.shape[1:] != (prev, 3, 3):
      raise SpecError(f"'features.{index}.weight' has shape {kernel.shape}, expected "
                      f"(out, {prev}, 3, 3).")
    params[f"conv{i}"] = {"kernel": _conv(kernel), "bias": _take(
        state, used, f"features.{index}.bias", (kernel.shape[0],))}
    prev = kernel.shape[0]
  params["head"] = _linear(state, used, "classifier", prev)
  _check_all_used(state, used, f"VGG with {len(found)} convs")
  return {"params": params}
