"""Data sources, on data the tests generate: npz files, image folders, the CUB/NABirds layout,
tensorflow-datasets mocked offline; and the batches, splits and embeddings built on them."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import data as data_lib

TFDS_REASON = ('tensorflow-datasets is not installed; these tests run in CI, which installs '
               'it with the dev extra (pip install -e ".[dev]", or "zipjax[tfds]")')


def _image(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
  return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def _save(path, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def _band_image(h: int, w: int) -> np.ndarray:
  """Black, with its central square white: what a centre crop must keep."""
  img = np.zeros((h, w, 3), np.uint8)
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img[top:top + s, left:left + s] = 255
  return img


# ------------------------------------------------------------------------------------------
# Dataset and selection helpers.


def testfirst_per_class_matches_a_loop():
  y = np.random.default_rng(0).integers(0, 7, 200)
  for cap in (0, 1, 3, 50):
    seen = {}
    want = []
    for label in y:
      seen[label] = seen.get(label, 0) + 1
      want.append(seen[label] <= cap)
    np.testing.assert_array_equal(data_lib.first_per_class(y, cap), want)


def test_subset_and_limit_per_class():
  rng = np.random.default_rng(1)
  ds = data_lib.Dataset(_image(rng, 12, 4, 4)[..., None].reshape(12, 4, 4, 1),
                        np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 0]), ("a", "b", "c"),
                        mean=(0.0,), std=(1.0,))
  sub = ds.subset([0, 2])
  assert set(sub.y) == {0, 2} and len(sub) == 9
  assert sub.subset([0, 2]) is sub  # nothing removed: no copy
  capped = ds.limit_per_class(2)
  np.testing.assert_array_equal(capped.y, [0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(capped.x, ds.x[:6])
  assert ds.limit_per_class(None) is ds and ds.limit_per_class(100) is ds


def test_load_source_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="Unknown data source 'cifar11'.*known: .*'cifar10'"):
    data_lib.load_source("cifar11")
  with pytest.raises(ValueError, match="reads local files: pass path="):
    data_lib.load_source("cifar10_npz")
  with pytest.raises(ValueError, match="varying size: pass image_size="):
    data_lib.load_source("stanford_dogs")
  with pytest.raises(FileNotFoundError, match="train.npz"):
    data_lib.load_source("cifar10_npz", path=tmp_path)


def test_cifar10_npz_source_filters_and_caps(tmp_path):
  rng = np.random.default_rng(2)
  for split, n in (("train", 60), ("test", 30)):
    np.savez(tmp_path / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y=np.arange(n) % 10)
  train, test = data_lib.load_source("cifar10_npz", path=tmp_path, classes=[3, 4],
                                     max_per_class=4, max_test_per_class=1)
  np.testing.assert_array_equal(train.y, [3, 4, 3, 4, 3, 4, 3, 4])
  np.testing.assert_array_equal(test.y, [3, 4])
  assert train.class_names == data_lib.CIFAR10_CLASSES and train.x.dtype == np.uint8
  with np.load(tmp_path / "train.npz") as f:
    np.testing.assert_array_equal(train.x[0], f["x"][3])


def test_digits_source():
  train, test = data_lib.load_source("digits", classes=[1, 2], max_per_class=5)
  assert train.x.shape == (10, 8, 8, 1) and sorted(set(train.y)) == [1, 2]
  assert len(test) > 10


# ------------------------------------------------------------------------------------------
# Image folders.


@pytest.fixture
def class_folders(tmp_path):
  """root/<class>/<i>.png: cat 3 images, dog 2, emu 4, all 12x12 RGB; returns (root, images)."""
  rng = np.random.default_rng(3)
  images = {}
  for name, n in (("cat", 3), ("dog", 2), ("emu", 4)):
    images[name] = [_image(rng, 12, 12) for _ in range(n)]
    for i, img in enumerate(images[name]):
      _save(tmp_path / "root" / name / f"{i:02d}.png", img)
  (tmp_path / "root" / "cat" / "notes.txt").write_text("not an image")
  return tmp_path / "root", images


def test_image_folder_loads_exact_pixels_in_order(class_folders):
  root, images = class_folders
  ds = data_lib.load_image_folder(root)
  assert ds.class_names == ("cat", "dog", "emu")
  np.testing.assert_array_equal(ds.y, [0, 0, 0, 1, 1, 2, 2, 2, 2])
  np.testing.assert_array_equal(ds.x, np.stack(images["cat"] + images["dog"] + images["emu"]))
  assert ds.mean == data_lib.IMAGENET_MEAN


def test_image_folder_classes_caps_and_order(class_folders):
  root, images = class_folders
  ds = data_lib.load_image_folder(root, classes=[0, 2], max_per_class=2, num_threads=2)
  np.testing.assert_array_equal(ds.y, [0, 0, 2, 2])
  np.testing.assert_array_equal(ds.x, np.stack(images["cat"][:2] + images["emu"][:2]))
  ds = data_lib.load_image_folder(root, class_names=("emu", "cat"))
  np.testing.assert_array_equal(ds.y, [0, 0, 0, 0, 1, 1, 1])
  with pytest.raises(FileNotFoundError, match=r"no folder for classes \['yak'\]"):
    data_lib.load_image_folder(root, class_names=("cat", "yak"))
  with pytest.raises(ValueError, match="no images left"):
    data_lib.load_image_folder(root, max_per_class=0)


def test_image_folder_sizes_and_channels(tmp_path):
  rng = np.random.default_rng(4)
  _save(tmp_path / "a" / "0.png", _image(rng, 10, 14))
  _save(tmp_path / "a" / "1.png", _image(rng, 20, 9, 1))  # greyscale
  Image.fromarray(_image(rng, 16, 16, 4), mode="RGBA").save(tmp_path / "a" / "2.png")
  with pytest.raises(ValueError, match="pass image_size="):
    data_lib.load_image_folder(tmp_path)
  ds = data_lib.load_image_folder(tmp_path, image_size=8)
  assert ds.x.shape == (3, 8, 8, 3) and ds.x.dtype == np.uint8


@pytest.mark.parametrize("h,w", [(10, 30), (30, 10)])
def test_image_folder_crops_the_centre(tmp_path, h, w):
  _save(tmp_path / "a" / "0.png", _band_image(h, w))
  ds = data_lib.load_image_folder(tmp_path, image_size=10)
  assert ds.x.shape == (1, 10, 10, 3)
  assert (ds.x == 255).all()  # exactly the white centre, nothing of the black sides
  small = data_lib.load_image_folder(tmp_path, image_size=5)
  assert small.x.shape == (1, 5, 5, 3)
  assert small.x[:, 1:-1, 1:-1].min() >= 250  # the border blends with the black when resized


def test_image_folder_source_uses_train_classes_for_test(tmp_path):
  rng = np.random.default_rng(5)
  for split, names in (("train", ("a", "b", "c")), ("test", ("a", "b", "c", "zzz"))):
    for name in names:
      _save(tmp_path / split / name / "0.png", _image(rng, 6, 6))
  train, test = data_lib.load_source("image_folder", path=tmp_path, image_size=6)
  assert train.class_names == test.class_names == ("a", "b", "c")
  np.testing.assert_array_equal(test.y, [0, 1, 2])


@pytest.fixture
def nabirds_folder(tmp_path):
  """A NABirds-style release: UUID image ids, class ids that skip the hierarchy's inner nodes."""
  rng = np.random.default_rng(6)
  root = tmp_path / "nabirds"
  classes = {0: "Birds", 295: "Ducks", 817: "Mallard (Female)", 999: "Mallard (Male)"}
  rows = []  # (image id, class id, train?, image)
  for i, (cid, train) in enumerate([(817, 1), (295, 1), (999, 0), (817, 1), (295, 0), (817, 0),
                                    (999, 1)]):
    rows.append((f"{i:04d}abcd-ef01-2345-6789-abcdef{i:06d}", cid, train,
                 _image(rng, 8 + i, 12)))
  for image_id, cid, _, img in rows:
    _save(root / "images" / f"{cid:04d}" / f"{image_id.replace('-', '')}.png", img)

  def write(name, lines):
    (root / name).write_text("".join(f"{line}\n" for line in lines))

  write("images.txt", [f"{r[0]} {r[1]:04d}/{r[0].replace('-', '')}.png" for r in rows])
  write("image_class_labels.txt", [f"{r[0]} {r[1]}" for r in rows])
  write("train_test_split.txt", [f"{r[0]} {r[2]}" for r in rows])
  write("classes.txt", [f"{cid} {name}" for cid, name in classes.items()])
  return root, rows


def test_cub_format_reads_the_release_layout(nabirds_folder):
  root, rows = nabirds_folder
  train = data_lib.load_cub_format(root, "train", image_size=8)
  assert train.class_names == ("Ducks", "Mallard (Female)", "Mallard (Male)")
  # Class ids 295, 817, 999 (the ones that label images) become labels 0, 1, 2.
  np.testing.assert_array_equal(train.y, [1, 0, 1, 2])
  assert train.x.shape == (4, 8, 8, 3)
  test = data_lib.load_cub_format(root, "test", image_size=None, classes=[1])
  assert test.x.shape == (1, 13, 12, 3)
  np.testing.assert_array_equal(test.x[0], rows[5][3])
  tr, te = data_lib.load_source("nabirds", path=root, image_size=8, max_per_class=1)
  np.testing.assert_array_equal(tr.y, [1, 0, 2])
  assert len(te) == 3
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    data_lib.load_cub_format(root, "val")
  with pytest.raises(FileNotFoundError, match="images.txt"):
    data_lib.load_cub_format(root / "images", "train")


# ------------------------------------------------------------------------------------------
# tensorflow-datasets, offline.


def test_tfds_loader_without_tfds_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r'pip install "zipjax\[tfds\]"'):
    data_lib.load_tfds("cifar100", "train")
  with pytest.raises(ImportError, match=r'pip install "zipjax\[tfds\]"'):
    data_lib.load_source("caltech_birds2011", image_size=32)


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets", reason=TFDS_REASON)


def _serve(examples):
  """A mock ``as_dataset``: serves [(uint8 image, label)] as PNG bytes in this order."""

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kw):
    del self, split, read_config, shuffle_files, kw
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    images = [tf.io.encode_png(img).numpy() for img, _ in examples]
    labels = np.array([label for _, label in examples], np.int64)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    if not (decoders and "image" in decoders):  # the loader asks for the encoded bytes
      ds = ds.map(lambda ex: {**ex, "image": tf.io.decode_png(ex["image"], channels=3)})
    return ds

  return as_dataset


def test_tfds_cifar100_keeps_pixels_filters_and_caps(tfds, tmp_path):
  rng = np.random.default_rng(7)
  labels = [5, 99, 5, 17, 5, 42, 99, 5]
  examples = [(_image(rng, 32, 32), label) for label in labels]
  with tfds.testing.mock_data(as_dataset_fn=_serve(examples)):
    train, test = data_lib.load_source("cifar100", path=str(tmp_path), classes=[5, 17, 99],
                                       max_per_class=2)
  keep = [0, 1, 2, 3, 6]  # 5, 99, 5, 17, 99: the first two of each wanted class
  np.testing.assert_array_equal(train.y, [labels[i] for i in keep])
  np.testing.assert_array_equal(train.x, np.stack([examples[i][0] for i in keep]))
  assert len(train.class_names) == 100
  assert train.mean == data_lib.CIFAR100_MEAN and train.std == data_lib.CIFAR100_STD
  np.testing.assert_array_equal(test.y, [5, 99, 5, 17, 5, 99, 5])  # test: no cap


@pytest.mark.parametrize("name,num_classes", [("stanford_dogs", 120), ("oxford_iiit_pet", 37),
                                              ("caltech_birds2011", 200)])
def test_tfds_fine_grained_sets_resize_like_the_folder_loader(tfds, tmp_path, name,
                                                              num_classes):
  rng = np.random.default_rng(8)
  examples = [(_band_image(30, 60), 3), (_band_image(45, 20), num_classes - 1),
              (_image(rng, 40, 50), 0)]
  with tfds.testing.mock_data(as_dataset_fn=_serve(examples)):
    train, test = data_lib.load_source(name, path=str(tmp_path), image_size=16)
  assert data_lib.SOURCES[name].num_classes == num_classes == len(train.class_names)
  assert train.x.shape == (3, 16, 16, 3) and train.x.dtype == np.uint8
  np.testing.assert_array_equal(train.y, [3, num_classes - 1, 0])
  assert train.x[:2, 1:-1, 1:-1].min() >= 250  # centre crops of the white squares
  assert len(test) == 3 and train.mean == data_lib.IMAGENET_MEAN
  for i, (img, _) in enumerate(examples):  # TensorFlow's resize agrees with Pillow's
    _save(tmp_path / "folder" / "a" / f"{i}.png", img)
  folder = data_lib.load_image_folder(tmp_path / "folder", image_size=16)
  diff = np.abs(folder.x.astype(np.int32) - train.x.astype(np.int32))
  assert diff.mean() < 4.0


def test_tfds_random_mock_imagenet_cap_is_a_prefix_per_class(tfds, tmp_path):
  with tfds.testing.mock_data(num_examples=60):
    full = data_lib.load_tfds("imagenet2012", "train", image_size=8, data_dir=tmp_path)
    part = data_lib.load_tfds("imagenet2012", "train", image_size=8, data_dir=tmp_path,
                              classes=range(0, 1000, 2), max_per_class=1)
    with pytest.raises(ValueError, match="varying size"):
      data_lib.load_tfds("imagenet2012", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"classes \[1000\] outside"):
      data_lib.load_tfds("imagenet2012", "train", image_size=8, data_dir=tmp_path,
                         classes=[1, 1000])
  assert full.x.shape == (60, 8, 8, 3) and len(full.class_names) == 1000
  want = np.isin(full.y, np.arange(0, 1000, 2)) & data_lib.first_per_class(full.y, 1)
  np.testing.assert_array_equal(part.y, full.y[want])
  np.testing.assert_array_equal(part.x, full.x[want])


# ------------------------------------------------------------------------------------------
# Splits, batches, embeddings.


def test_class_split_is_a_seeded_partition():
  a = data_lib.class_split(100, 2, seed=3)
  assert [len(t) for t in a] == [50, 50]
  np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(100))
  b = data_lib.class_split(100, 2, seed=3)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  with pytest.raises(ValueError, match="do not split into 3 equal tasks"):
    data_lib.class_split(10, 3, seed=0)


def test_train_batches_depend_only_on_seed_and_epoch():
  train, _ = data_lib.load_digits()
  first = list(data_lib.train_batches(train, 64, seed=1, epoch=2))
  again = list(data_lib.train_batches(train, 64, seed=1, epoch=2))
  other = next(data_lib.train_batches(train, 64, seed=1, epoch=3))
  assert len(first) == len(train) // 64
  for (x1, y1), (x2, y2) in zip(first, again):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(first[0][1], other[1])
  assert first[0][0].dtype == np.float32 and first[0][0].shape == (64, 8, 8, 1)


def test_eval_and_calibration_batches():
  train, _ = data_lib.load_digits()
  batches = data_lib.EvalBatches(train.take(130), 50)
  assert len(batches) == 3 and [len(y) for _, y in batches] == [50, 50, 30]
  assert [len(y) for _, y in batches] == [50, 50, 30]  # re-iterable
  calib = data_lib.calibration_batches(train, num_images=120, batch_size=50, seed=0,
                                       augmentation=True)
  assert [len(x) for x in calib] == [50, 50, 20]


def test_class_embeddings(tmp_path):
  csv = tmp_path / "emb.csv"
  csv.write_text(",0,1,2\ncat,3,0,4\ndog,0,2,0\n")
  names, emb = data_lib.load_class_embeddings(csv)
  assert names == ("cat", "dog")
  np.testing.assert_allclose(emb, [[0.6, 0, 0.8], [0, 1, 0]], rtol=1e-6)
  q = data_lib.random_class_embeddings(5, 16, seed=0)
  np.testing.assert_allclose(q @ q.T, np.eye(5), atol=1e-5)
