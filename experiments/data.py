"""Datasets split into disjoint class subsets, with the paper's augmentation.

Images are uint8 NHWC in memory and become normalised float32 batches on the way out, so a
whole CIFAR-10 split costs 150 MB rather than 600 MB.

Sources (see :data:`SOURCES` and :func:`load_source`):

- CIFAR-10 from local ``train.npz``/``test.npz`` files, scikit-learn's bundled 8x8 digits;
- tensorflow-datasets: CIFAR-10, CIFAR-100, ImageNet-1k (``imagenet2012``, class subsets),
  Stanford Dogs, Oxford-IIIT Pets, CUB-200-2011 (``caltech_birds2011``);
- image folders: one sub-folder per class (:func:`load_image_folder`), or the release layout of
  NABirds and CUB-200-2011 (``images.txt``, ``train_test_split.txt``, ...,
  :func:`load_cub_format`). tensorflow-datasets has no NABirds.

Memory: every source returns the whole split in memory as uint8, ``N * S * S * 3`` bytes for
N images of size S. At S = 224 that is 150 KB an image: 39 GB for 200 ImageNet classes (260k
images), 190 GB for all of ImageNet. Load only the classes a model trains on (``classes=``),
cap the images per class (``max_per_class=``) or choose a smaller ``image_size`` (S = 128:
49 KB an image). The loaders assemble the array chunk by chunk, so loading peaks at about the
size of the result, not twice it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

CIFAR10_MEAN, CIFAR10_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
CIFAR100_MEAN, CIFAR100_STD = (129.3, 124.1, 112.4), (68.2, 65.4, 70.4)
IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

TFDS_EXTRA_HINT = 'pip install "zipjax[tfds]"'
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images (N, H, W, C) uint8, integer labels, and the per-channel normalisation."""

  x: np.ndarray
  y: np.ndarray
  class_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    if len(self.x) != len(self.y):
      raise ValueError(f"Dataset has {len(self.x)} images but {len(self.y)} labels.")

  def __len__(self):
    return len(self.y)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def normalise(self, x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std))

  def subset(self, classes: Sequence[int]) -> "Dataset":
    """The images of ``classes``; labels keep their global indices.

    Returns ``self`` (no copy) when every image already belongs to ``classes``.
    """
    keep = np.isin(self.y, np.asarray(classes))
    if keep.all():
      return self
    return dataclasses.replace(self, x=self.x[keep], y=self.y[keep])

  def take(self, n: int) -> "Dataset":
    return dataclasses.replace(self, x=self.x[:n], y=self.y[:n])

  def limit_per_class(self, max_per_class: int | None) -> "Dataset":
    """At most ``max_per_class`` images of each class: the first ones, in dataset order."""
    if max_per_class is None:
      return self
    keep = first_per_class(self.y, max_per_class)
    if keep.all():
      return self
    return dataclasses.replace(self, x=self.x[keep], y=self.y[keep])


def first_per_class(y: np.ndarray, max_per_class: int) -> np.ndarray:
  """Mask of the first ``max_per_class`` occurrences of each label in ``y``."""
  if max_per_class < 0:
    raise ValueError(f"max_per_class must be >= 0, got {max_per_class}.")
  order = np.argsort(y, kind="stable")
  sorted_y = y[order]
  starts = np.searchsorted(sorted_y, sorted_y, side="left")
  rank = np.empty(len(y), np.int64)
  rank[order] = np.arange(len(y)) - starts
  return rank < max_per_class


# ------------------------------------------------------------------------------------------
# Local files: CIFAR-10 .npz, scikit-learn digits.


def load_cifar10_npz(directory: str | os.PathLike) -> tuple[Dataset, Dataset]:
  """CIFAR-10 train and test sets from ``directory``/{train,test}.npz (arrays x, y)."""
  out = []
  for split in ("train", "test"):
    path = os.path.join(directory, f"{split}.npz")
    if not os.path.exists(path):
      raise FileNotFoundError(f"No {path}; pass the folder that holds CIFAR-10's train.npz and "
                              "test.npz (arrays x uint8 (N, 32, 32, 3) and y).")
    with np.load(path) as f:
      x, y = f["x"], f["y"].astype(np.int32)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
      raise ValueError(f"{path}: x must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}.")
    out.append(Dataset(x, y, CIFAR10_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD))
  return out[0], out[1]


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
  """scikit-learn's bundled 8x8 digits (1797 images, no download), as 8x8x1 images."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(len(y) * test_fraction))
  names = tuple(str(i) for i in range(10))
  mk = lambda idx: Dataset(x[idx], y[idx], names, mean=(78.0,), std=(95.0,))
  return mk(order[n_test:]), mk(order[:n_test])


# ------------------------------------------------------------------------------------------
# Chunked assembly: the result, not twice the result, in memory.


def _assemble(chunks: Iterator[tuple[np.ndarray, np.ndarray]],
              what: str) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates (images, labels) chunks into one array, freeing each chunk once copied."""
  queue = collections.deque(c for c in chunks if len(c[1]))
  if not queue:
    raise ValueError(f"{what}: no images left after filtering by class and max_per_class.")
  shapes = {c[0].shape[1:] for c in queue}
  if len(shapes) > 1:
    raise ValueError(f"{what}: images of different sizes {sorted(shapes)}; pass image_size=.")
  n = sum(len(c[1]) for c in queue)
  x = np.empty((n,) + queue[0][0].shape[1:], np.uint8)
  y = np.empty((n,), np.int32)
  pos = 0
  while queue:
    cx, cy = queue.popleft()
    x[pos:pos + len(cy)] = cx
    y[pos:pos + len(cy)] = cy
    pos += len(cy)
  return x, y


# ------------------------------------------------------------------------------------------
# tensorflow-datasets.


def _import_tfds() -> tuple[Any, Any]:
  """(tensorflow, tensorflow_datasets), imported on first use; TensorFlow kept off the GPU."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Loading tensorflow-datasets sources needs tensorflow-datasets and TensorFlow, which are "
        f"not installed: {TFDS_EXTRA_HINT}. (Without them, use the .npz or image-folder "
        f"loaders.) Original error: {e}") from e
  try:  # TensorFlow only decodes images here: leave the accelerator's memory to JAX.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised by the caller
    pass
  return tf, tfds


def _class_mask(num_classes: int, classes: Sequence[int] | None, what: str) -> np.ndarray:
  if classes is None:
    return np.ones(num_classes, bool)
  classes = np.asarray(classes, np.int64)
  bad = classes[(classes < 0) | (classes >= num_classes)]
  if bad.size:
    raise ValueError(f"{what}: classes {bad.tolist()} outside [0, {num_classes}).")
  mask = np.zeros(num_classes, bool)
  mask[classes] = True
  return mask


def load_tfds(name: str, split: str, *, image_size: int | None = None,
              classes: Sequence[int] | None = None, max_per_class: int | None = None,
              data_dir: str | os.PathLike | None = None, download: bool = True,
              manual_dir: str | os.PathLike | None = None,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              image_key: str = "image", label_key: str = "label",
              chunk_size: int = 512) -> Dataset:
  """One split of a tensorflow-datasets image classification dataset, in memory.

  Needs ``zipjax[tfds]``. Images are read in the dataset's stored order (no file shuffling),
  so the result is the same on every call.

  Args:
    name: the tfds name, e.g. "cifar100", "imagenet2012", "stanford_dogs".
    split: the tfds split, e.g. "train", "test", "validation".
    image_size: resize so that the shorter side is ``image_size`` (bilinear, antialiased),
      then crop the centre square. None: keep the stored size (all images must share it).
    classes: keep only these classes; labels keep their global indices (as ``Dataset.subset``).
      Images of other classes are skipped before decoding.
    max_per_class: keep at most this many images of each class: the first ones in stored order.
    data_dir: tfds data folder (None: tfds's default, ``~/tensorflow_datasets``).
    download: download and prepare the dataset first if it is not there yet (a no-op when it
      is). ImageNet must be downloaded by hand: put its tar files in ``manual_dir``.
    manual_dir: folder of manually downloaded files (None: ``data_dir``/downloads/manual).
    mean, std: per-channel normalisation in 0..255 units stored with the dataset.
    image_key, label_key: the feature names of the image and the class label.
    chunk_size: images decoded per chunk while loading.
  """
  tf, tfds = _import_tfds()
  what = f"tfds {name}[{split}]"
  builder = tfds.builder(name, data_dir=data_dir)
  if download:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  label_feature = builder.info.features[label_key]
  names = tuple(label_feature.names)
  image_feature = builder.info.features[image_key]
  channels = image_feature.shape[-1] or 3
  if image_size is None and None in image_feature.shape[:2]:
    raise ValueError(f"{what} has images of varying size {image_feature.shape}; pass "
                     "image_size= to resize them.")
  wanted = tf.constant(_class_mask(len(names), classes, what))
  cap = tf.constant(np.iinfo(np.int64).max if max_per_class is None else max_per_class,
                    tf.int64)

  no_autograph = tf.autograph.experimental.do_not_convert

  @no_autograph
  def image_label(ex):
    return ex[image_key], tf.cast(ex[label_key], tf.int32)

  @no_autograph
  def count(counts, elem):
    """Marks the images to keep, counting the kept images of each class."""
    image, label = elem
    keep = tf.gather(wanted, label) & (tf.gather(counts, label) < cap)
    counts = tf.tensor_scatter_nd_add(counts, label[None, None], tf.cast(keep, tf.int64)[None])
    return counts, (image, label, keep)

  @no_autograph
  def kept(image, label, keep):
    del image, label
    return keep

  @no_autograph
  def drop_flag(image, label, keep):
    del keep
    return image, label

  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(image_label)
  if classes is not None or max_per_class is not None:
    ds = ds.scan(tf.zeros(len(names), tf.int64), count).filter(kept).map(drop_flag)

  encoded = ds.element_spec[0].dtype == tf.string

  @no_autograph
  def prepare(image, label):
    if encoded:
      image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    if image_size is not None:
      image = _tf_resize_centre_crop(tf, image, image_size)
    return image, label

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(chunk_size).prefetch(tf.data.AUTOTUNE)
  x, y = _assemble(((np.asarray(a), np.asarray(b)) for a, b in tfds.as_numpy(ds)), what)
  return Dataset(x, y, names, mean=tuple(mean), std=tuple(std))


def _tf_resize_centre_crop(tf, image, size: int):
  """Shorter side to ``size`` (bilinear, antialiased), centre ``size`` x ``size`` crop, uint8."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  top = (new[0] - size) // 2
  left = (new[1] - size) // 2
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(image, (size, size, None))
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# ------------------------------------------------------------------------------------------
# Image folders.


def _read_image(path: str, image_size: int | None) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im = im.convert("RGB")
    if image_size is not None:
      w, h = im.size
      scale = image_size / min(w, h)
      nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
      if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
      left, top = (nw - image_size) // 2, (nh - image_size) // 2
      im = im.crop((left, top, left + image_size, top + image_size))
    return np.asarray(im, np.uint8)


def _read_images(paths: Sequence[str], labels: Sequence[int], image_size: int | None,
                 num_threads: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes ``paths`` in parallel threads straight into one preallocated array."""
  if not paths:
    raise ValueError(f"{what}: no images left after filtering by class and max_per_class.")
  first = _read_image(paths[0], image_size)
  x = np.empty((len(paths),) + first.shape, np.uint8)
  x[0] = first

  def read(i: int) -> None:
    img = _read_image(paths[i], image_size)
    if img.shape != first.shape:
      raise ValueError(f"{what}: {paths[i]} is {img.shape[:2]} but {paths[0]} is "
                       f"{first.shape[:2]}; pass image_size= to resize them.")
    x[i] = img

  workers = num_threads or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for _ in pool.map(read, range(1, len(paths))):
      pass
  return x, np.asarray(labels, np.int32)


def _select(labels: np.ndarray, num_classes: int, classes: Sequence[int] | None,
            max_per_class: int | None, what: str) -> np.ndarray:
  """Indices kept by the class filter and the per-class cap, in their original order."""
  keep = _class_mask(num_classes, classes, what)[labels]
  if max_per_class is not None:
    idx = np.flatnonzero(keep)
    keep[idx[~first_per_class(labels[idx], max_per_class)]] = False
  return np.flatnonzero(keep)


def load_image_folder(root: str | os.PathLike, *, image_size: int | None = None,
                      class_names: Sequence[str] | None = None,
                      classes: Sequence[int] | None = None, max_per_class: int | None = None,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      num_threads: int | None = None) -> Dataset:
  """Images stored one folder per class: ``root/<class name>/<image>``.

  Args:
    root: the folder of class folders (e.g. an ImageNet-style ``train/``).
    image_size: shorter side to ``image_size``, then the centre square; None: keep the size
      (all images must share it).
    class_names: the classes in label order (default: the sorted sub-folder names); every one
      must have a folder.
    classes: keep only these class indices; labels keep their global indices.
    max_per_class: keep the first (by sorted file name) ``max_per_class`` images of each class.
    mean, std: per-channel normalisation in 0..255 units.
    num_threads: decoding threads (default: the number of CPUs, at most 32).
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"No folder {root}; pass a folder with one sub-folder per class.")
  found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  names = tuple(class_names) if class_names is not None else tuple(found)
  missing = sorted(set(names) - set(found))
  if missing:
    raise FileNotFoundError(f"{root}: no folder for classes {missing}; found {found}.")
  if not names:
    raise ValueError(f"{root} has no class sub-folders.")
  paths, labels = [], []
  for label, name in enumerate(names):
    folder = os.path.join(root, name)
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(folder, f) for f in files]
    labels += [label] * len(files)
  labels = np.asarray(labels, np.int64)
  idx = _select(labels, len(names), classes, max_per_class, root)
  x, y = _read_images([paths[i] for i in idx], labels[idx], image_size, num_threads, root)
  return Dataset(x, y, names, mean=tuple(mean), std=tuple(std))


def _read_table(path: str) -> list[tuple[str, str]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {path}; the folder must hold the dataset's release files "
                            "(images.txt, image_class_labels.txt, train_test_split.txt, "
                            "classes.txt, images/).")
  with open(path) as f:
    rows = [line.strip().split(" ", 1) for line in f if line.strip()]
  return [(r[0], r[1].strip()) for r in rows]


def load_cub_format(root: str | os.PathLike, split: str, *, image_size: int | None = 224,
                    classes: Sequence[int] | None = None, max_per_class: int | None = None,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    num_threads: int | None = None) -> Dataset:
  """A dataset in the release layout of CUB-200-2011 and NABirds.

  ``root`` holds ``images/`` and the text files ``images.txt`` (image id, path under images/),
  ``image_class_labels.txt`` (image id, class id), ``train_test_split.txt`` (image id, 1 for
  train, 0 for test) and ``classes.txt`` (class id, name). Class ids that label at least one
  image become labels 0..K-1 in increasing id order (NABirds: 555 classes; its other class
  ids name the hierarchy's inner nodes).

  Args:
    root: the dataset folder.
    split: "train" or "test".
    image_size, classes, max_per_class, mean, std, num_threads: as in :func:`load_image_folder`.
  """
  root = os.fspath(root)
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  images = dict(_read_table(os.path.join(root, "images.txt")))
  image_class = _read_table(os.path.join(root, "image_class_labels.txt"))
  is_train = dict(_read_table(os.path.join(root, "train_test_split.txt")))
  class_name = dict(_read_table(os.path.join(root, "classes.txt")))
  used = sorted({int(c) for _, c in image_class})
  label_of = {c: i for i, c in enumerate(used)}
  names = tuple(class_name.get(str(c), str(c)) for c in used)
  want = "1" if split == "train" else "0"
  paths, labels = [], []
  for image_id, c in image_class:
    if is_train.get(image_id) == want:
      paths.append(os.path.join(root, "images", images[image_id]))
      labels.append(label_of[int(c)])
  labels = np.asarray(labels, np.int64)
  what = f"{root}[{split}]"
  idx = _select(labels, len(names), classes, max_per_class, what)
  x, y = _read_images([paths[i] for i in idx], labels[idx], image_size, num_threads, what)
  return Dataset(x, y, names, mean=tuple(mean), std=tuple(std))


# ------------------------------------------------------------------------------------------
# Named sources, as the experiment configs refer to them.


@dataclasses.dataclass(frozen=True)
class Source:
  """A named data source: how to load its train and test splits.

  Attributes:
    loader: ``loader(path, image_size=, classes=, max_per_class=, max_test_per_class=,
      download=) -> (train, test)``.
    num_classes: its number of classes (None: known only once loaded, e.g. an image folder).
    image_size: the stored image size, or None when images vary and must be resized.
    needs_path: whether ``path`` is required (local files) rather than optional (tfds data_dir).
    requires: the extra to install, if any.
  """

  loader: Callable[..., tuple[Dataset, Dataset]]
  num_classes: int | None
  image_size: int | None
  needs_path: bool
  requires: str | None = None


def _filtered(train: Dataset, test: Dataset, classes, max_per_class,
              max_test_per_class) -> tuple[Dataset, Dataset]:
  if classes is not None:
    train, test = train.subset(classes), test.subset(classes)
  return train.limit_per_class(max_per_class), test.limit_per_class(max_test_per_class)


def _npz_source(path, *, image_size, classes, max_per_class, max_test_per_class, download):
  del download
  if image_size not in (None, 32):
    raise ValueError(f"cifar10_npz images are 32x32; image_size={image_size} is not supported.")
  return _filtered(*load_cifar10_npz(path), classes, max_per_class, max_test_per_class)


def _digits_source(path, *, image_size, classes, max_per_class, max_test_per_class, download):
  del path, download
  if image_size not in (None, 8):
    raise ValueError(f"digits images are 8x8; image_size={image_size} is not supported.")
  return _filtered(*load_digits(), classes, max_per_class, max_test_per_class)


def _tfds_source(name: str, test_split: str, mean, std):
  def loader(path, *, image_size, classes, max_per_class, max_test_per_class, download):
    kw = dict(image_size=image_size, classes=classes, data_dir=path, download=download,
              mean=mean, std=std)
    return (load_tfds(name, "train", max_per_class=max_per_class, **kw),
            load_tfds(name, test_split, max_per_class=max_test_per_class, **kw))
  return loader


def _cub_format_source(path, *, image_size, classes, max_per_class, max_test_per_class,
                       download):
  del download
  kw = dict(image_size=image_size, classes=classes)
  return (load_cub_format(path, "train", max_per_class=max_per_class, **kw),
          load_cub_format(path, "test", max_per_class=max_test_per_class, **kw))


def _folder_source(path, *, image_size, classes, max_per_class, max_test_per_class, download):
  del download
  train = load_image_folder(os.path.join(path, "train"), image_size=image_size, classes=classes,
                            max_per_class=max_per_class)
  test = load_image_folder(os.path.join(path, "test"), image_size=image_size, classes=classes,
                           max_per_class=max_test_per_class, class_names=train.class_names)
  return train, test


SOURCES: dict[str, Source] = {
    "cifar10_npz": Source(_npz_source, 10, 32, needs_path=True),
    "digits": Source(_digits_source, 10, 8, needs_path=False),
    "cifar10": Source(_tfds_source("cifar10", "test", CIFAR10_MEAN, CIFAR10_STD), 10, 32,
                      needs_path=False, requires="tfds"),
    "cifar100": Source(_tfds_source("cifar100", "test", CIFAR100_MEAN, CIFAR100_STD), 100, 32,
                       needs_path=False, requires="tfds"),
    "imagenet2012": Source(_tfds_source("imagenet2012", "validation", IMAGENET_MEAN,
                                        IMAGENET_STD), 1000, None, needs_path=False,
                           requires="tfds"),
    "stanford_dogs": Source(_tfds_source("stanford_dogs", "test", IMAGENET_MEAN, IMAGENET_STD),
                            120, None, needs_path=False, requires="tfds"),
    "oxford_iiit_pet": Source(_tfds_source("oxford_iiit_pet", "test", IMAGENET_MEAN,
                                           IMAGENET_STD), 37, None, needs_path=False,
                              requires="tfds"),
    "caltech_birds2011": Source(_tfds_source("caltech_birds2011", "test", IMAGENET_MEAN,
                                             IMAGENET_STD), 200, None, needs_path=False,
                                requires="tfds"),
    "cub200_folder": Source(_cub_format_source, 200, None, needs_path=True),
    "nabirds": Source(_cub_format_source, 555, None, needs_path=True),
    "image_folder": Source(_folder_source, None, None, needs_path=True),
}
"""Named sources. tfds sources take ``path`` as the tfds data folder (None: the default);
``cub200_folder``/``nabirds`` the dataset's release folder; ``image_folder`` a folder with
``train/`` and ``test/``, each with one sub-folder per class."""


def load_source(name: str, *, path: str | os.PathLike | None = None,
                image_size: int | None = None, classes: Sequence[int] | None = None,
                max_per_class: int | None = None, max_test_per_class: int | None = None,
                download: bool = True) -> tuple[Dataset, Dataset]:
  """Train and test sets of the source ``name`` (a key of :data:`SOURCES`).

  Args:
    name: the source.
    path: its local folder, or for tfds sources the tfds data folder (None: tfds's default).
    image_size: resize to this square size (sources with varying sizes need it).
    classes: keep only these classes (labels keep their global indices): load one task's
      classes of a large dataset without holding the others in memory.
    max_per_class: at most this many training images per class (the first ones).
    max_test_per_class: the same for the test set.
    download: let tfds download and prepare a missing dataset.
  """
  if name not in SOURCES:
    raise ValueError(f"Unknown data source {name!r}; known: {sorted(SOURCES)}.")
  src = SOURCES[name]
  if src.needs_path and path is None:
    raise ValueError(f"Data source {name!r} reads local files: pass path=.")
  if src.image_size is None and image_size is None:
    raise ValueError(f"Data source {name!r} has images of varying size: pass image_size=.")
  return src.loader(path, image_size=image_size, classes=classes, max_per_class=max_per_class,
                    max_test_per_class=max_test_per_class, download=download)


# ------------------------------------------------------------------------------------------
# Class splits, augmentation, batches.


def class_split(num_classes: int, num_tasks: int, *, seed: int) -> list[np.ndarray]:
  """Disjoint, equal class subsets chosen at random with ``seed``, each sorted."""
  if num_classes % num_tasks:
    raise ValueError(f"{num_classes} classes do not split into {num_tasks} equal tasks.")
  perm = np.random.default_rng(seed).permutation(num_classes)
  return [np.sort(c) for c in np.split(perm, num_tasks)]


def augment(x: np.ndarray, rng: np.random.Generator, *, pad: int = 4) -> np.ndarray:
  """Random crop after zero padding by ``pad``, and random horizontal flip (uint8 NHWC)."""
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  flip = rng.random(n) < 0.5
  out[flip] = out[flip, :, ::-1]
  return out


def train_batches(ds: Dataset, batch_size: int, *, seed: int, epoch: int,
                  augmentation: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled, augmented, normalised batches; the last partial batch is dropped.

  The order depends only on (seed, epoch), so an interrupted run resumes exactly.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(ds))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    idx = order[start:start + batch_size]
    x = ds.x[idx]
    if augmentation:
      x = augment(x, rng)
    yield ds.normalise(x), ds.y[idx]


class EvalBatches:
  """Re-iterable normalised (x, y) batches in order: for evaluation and calibration."""

  def __init__(self, ds: Dataset, batch_size: int):
    self.ds, self.batch_size = ds, batch_size

  def __iter__(self):
    for start in range(0, len(self.ds), self.batch_size):
      sl = slice(start, start + self.batch_size)
      yield self.ds.normalise(self.ds.x[sl]), self.ds.y[sl]

  def __len__(self):
    return -(-len(self.ds) // self.batch_size)


def calibration_batches(ds: Dataset, *, num_images: int, batch_size: int, seed: int,
                        augmentation: bool = False) -> list[np.ndarray]:
  """A fixed list of normalised input batches drawn at random from ``ds``."""
  rng = np.random.default_rng([seed, 7])
  idx = rng.permutation(len(ds))[:num_images]
  x = ds.x[idx]
  if augmentation:
    x = augment(x, rng)
  x = ds.normalise(x)
  return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


# ------------------------------------------------------------------------------------------
# Class embeddings for CLIP-style heads.


def load_class_embeddings(csv_path: str | os.PathLike) -> tuple[tuple[str, ...], np.ndarray]:
  """Class names and their (K, D) L2-normalised text embeddings from a CLIP features CSV."""
  names, rows = [], []
  with open(csv_path) as f:
    next(f)  # header: ,0,1,...
    for line in f:
      parts = line.rstrip("\n").split(",")
      names.append(parts[0])
      rows.append([float(v) for v in parts[1:]])
  emb = np.asarray(rows, np.float32)
  return tuple(names), emb / np.linalg.norm(emb, axis=1, keepdims=True)


def random_class_embeddings(num_classes: int, dim: int, *, seed: int) -> np.ndarray:
  """Fixed random orthonormal class embeddings (K, D), for datasets without CLIP vectors."""
  if num_classes > dim:
    raise ValueError(f"Cannot make {num_classes} orthonormal embeddings in {dim} dimensions.")
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, num_classes)))
  return q.T.astype(np.float32)
