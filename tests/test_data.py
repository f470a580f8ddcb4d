"""Tests for adm_lib.data: every source kind, label convention, resize and error."""

from __future__ import annotations

import io
import json
import pickle
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm_lib.data import (
    MAX_CLASSES,
    DataError,
    ImageDataset,
    count_classes,
    load_dataset,
)
from adm_lib.errors import TrainError

from .reference import EPS32

CIFAR10_TEST = Path(__file__).resolve().parents[1] / "../shared/data/cifar10/test.zip"


def pixels(seed: int, height: int = 8, width: int = 8, channels: int = 3) -> np.ndarray:
    """Random uint8 pixels, H x W x C (H x W when channels == 1)."""
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """Encode pixels as an image file."""
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(root: Path, names: list[str], **kwargs) -> list[np.ndarray]:
    """Write a PNG (lossless, whatever the extension says) per relative name."""
    arrays = []
    for seed, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays.append(pixels(seed, **kwargs))
        path.write_bytes(encode(arrays[-1]))
    return arrays


def write_zip(path: Path, files: dict[str, bytes], meta: object = "absent") -> Path:
    """Write a zip of files plus, unless meta is "absent", a dataset.json."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        if meta != "absent":
            archive.writestr("dataset.json", json.dumps(meta))
    return path


def scaled(arr: np.ndarray) -> torch.Tensor:
    """What the reference feeds its model for these uint8 pixels (C x H x W)."""
    arr = arr.astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


# Folders ------------------------------------------------------------------------------


def test_folder_labels_from_subfolders(tmp_path: Path) -> None:
    names = ["cat/a.png", "cat/b.PNG", "dog/c.JPG", "dog/deep/d.webp", "notes.txt"]
    arrays = write_images(tmp_path, names[:4])
    (tmp_path / "notes.txt").write_text("not an image")
    for labels in ("auto", "folder"):
        ds = load_dataset(tmp_path, labels=labels)
        assert isinstance(ds, ImageDataset)
        assert len(ds) == 4
        assert (ds.resolution, ds.channels, ds.num_classes) == (8, 3, 2)
        assert ds.class_names == ["cat", "dog"]
        assert ds.labels.dtype == np.int64
        assert ds.labels.tolist() == [0, 0, 1, 1]
        assert ds.source == str(tmp_path)
    image, label = ds[2]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8)
    assert image.is_contiguous()
    assert label == 1 and type(label) is int
    assert torch.equal(image, scaled(arrays[2]))
    batch = ds.images([0, 3])
    assert batch.shape == (2, 3, 8, 8)
    assert torch.equal(batch[1], scaled(arrays[3]))


def test_folder_labels_from_file_names(tmp_path: Path) -> None:
    write_images(tmp_path, ["3_000.png", "10_001.png", "3_002.png", "7_x_003.png"])
    for labels in ("auto", "filename"):
        ds = load_dataset(tmp_path, labels=labels)
        assert ds.class_names == ["10", "3", "7"]  # sorted as strings, like the ref.
        # Files sort as 10_001, 3_000, 3_002, 7_x_003.
        assert ds.labels.tolist() == [0, 1, 1, 2]
        assert [ds[i][1] for i in range(4)] == [0, 1, 1, 2]
    # Classes are numbered in sorted order, not in order of appearance.
    write_images(tmp_path / "nested", ["a/9_000.png", "b/1_000.png"])
    ds = load_dataset(tmp_path / "nested", labels="filename")
    assert ds.class_names == ["1", "9"] and ds.labels.tolist() == [1, 0]


def test_folder_without_labels(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png", "sub/b.png", "c_d.png"])
    for labels in ("auto", "none"):
        ds = load_dataset(tmp_path, labels=labels)
        assert ds.labels is None and ds.num_classes == 0 and ds.class_names == []
        assert [ds[i][1] for i in range(3)] == [-1, -1, -1]
    assert load_dataset(tmp_path / "sub", labels="auto").num_classes == 0


def test_inconsistent_folder_labels_name_the_file(tmp_path: Path) -> None:
    write_images(tmp_path, ["cat/a_1.png", "loose.png"])
    with pytest.raises(DataError, match="loose.png"):
        load_dataset(tmp_path, labels="folder")
    with pytest.raises(DataError, match="loose.png"):
        load_dataset(tmp_path, labels="filename")


def test_pixel_values_and_dtype(tmp_path: Path) -> None:
    arr = np.array([[0, 255], [128, 127]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    image, _ = load_dataset(tmp_path)[0]
    expected = [[[-1.0, 1.0], [128 / 127.5 - 1, 127 / 127.5 - 1]]]
    # x / 127.5 - 1 in float32 (2 roundings) against float64 rounded once;
    # each rounding of a value of size <= 2 is <= eps32 / 2.
    atol = 3 * EPS32 / 2
    assert torch.allclose(image, torch.tensor(expected), rtol=0, atol=atol)
    # Bit for bit what the reference computes in float32.
    assert torch.equal(image[0], torch.from_numpy(arr.astype(np.float32) / 127.5 - 1))


def test_channels(tmp_path: Path) -> None:
    gray = write_images(tmp_path / "gray", ["g.png"], channels=1)[0]
    rgb = write_images(tmp_path / "rgb", ["c.png"])[0]
    assert load_dataset(tmp_path / "gray").channels == 1
    assert load_dataset(tmp_path / "rgb").channels == 3
    as_rgb = load_dataset(tmp_path / "gray", channels=3)[0][0]
    assert as_rgb.shape == (3, 8, 8)
    assert torch.equal(as_rgb, scaled(np.stack([gray] * 3, axis=-1)))
    as_gray = load_dataset(tmp_path / "rgb", channels=1)[0][0]
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert torch.equal(as_gray, scaled(expected))


def test_a_colour_image_anywhere_makes_the_set_rgb(tmp_path: Path) -> None:
    # Sorted, the greyscale images come first: they must not decide.
    grey = write_images(tmp_path / "mixed", ["a.png", "b.png"], channels=1)
    write_images(tmp_path / "mixed" / "z", ["c.png"])
    files = {p.relative_to(tmp_path / "mixed").as_posix(): p.read_bytes()
             for p in sorted((tmp_path / "mixed").rglob("*.png"))}
    archive = write_zip(tmp_path / "mixed.zip", files)
    for source in (tmp_path / "mixed", archive):
        ds = load_dataset(source, labels="none")
        assert ds.channels == 3
        assert [ds[i][0].shape for i in range(3)] == [(3, 8, 8)] * 3
        assert torch.equal(ds[0][0], scaled(np.stack([grey[0]] * 3, axis=-1)))
    write_images(tmp_path / "grey", ["a.png", "b.png"], channels=1)
    assert load_dataset(tmp_path / "grey").channels == 1


def test_a_greyscale_set_reads_every_header(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"], channels=1)
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image .*b.png"):
        load_dataset(tmp_path)


def test_name_says_where_an_image_comes_from(tmp_path: Path) -> None:
    write_images(tmp_path / "f", ["a/0.png", "b/1.png"])
    assert load_dataset(tmp_path / "f").name(1) == str(tmp_path / "f/b/1.png")
    archive = write_zip(tmp_path / "z.zip", {"x/0.png": encode(pixels(0))})
    assert load_dataset(archive).name(0) == f"{archive}:x/0.png"
    np.savez(tmp_path / "n.npz", np.zeros((2, 8, 8), np.uint8))
    assert load_dataset(tmp_path / "n.npz").name(1) == f"{tmp_path / 'n.npz'}[1]"


def reference_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """guided_diffusion.image_datasets.center_crop_arr, written out independently."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(
            tuple(x // 2 for x in pil_image.size), resample=Image.BOX
        )
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


@pytest.mark.parametrize("width, height", [(100, 70), (45, 90)])
def test_resize_follows_the_reference(tmp_path: Path, width: int, height: int) -> None:
    arr = pixels(7, height=height, width=width)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    ds = load_dataset(tmp_path, resolution=32)
    assert ds.resolution == 32
    image = ds[0][0]
    assert image.shape == (3, 32, 32)
    expected = reference_center_crop_arr(Image.fromarray(arr), 32)
    assert torch.equal(image, scaled(expected))
    # A plain bicubic resize of the whole image would differ: the test can tell.
    plain = np.asarray(Image.fromarray(arr).resize((32, 32), Image.BICUBIC))
    assert not torch.equal(image, scaled(plain))


def test_sizes_must_agree_without_resolution(tmp_path: Path) -> None:
    write_images(tmp_path / "mixed", ["a.png"])
    write_images(tmp_path / "mixed", ["b.png"], height=10, width=10)
    ds = load_dataset(tmp_path / "mixed")
    assert ds.resolution == 8 and ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="b.png"):
        ds[1]
    assert load_dataset(tmp_path / "mixed", resolution=8)[1][0].shape == (3, 8, 8)
    write_images(tmp_path / "oblong", ["c.png"], height=6, width=9)
    with pytest.raises(DataError, match="c.png.*not square"):
        load_dataset(tmp_path / "oblong")


# Zip archives -------------------------------------------------------------------------


def small_zip(path: Path, meta: object = "absent", count: int = 6) -> Path:
    """A dataset_tool-style zip: count images alternating between two folders."""
    files = {
        f"{'ab'[i % 2]}/{i:04d}.png": encode(pixels(i, channels=1))
        for i in range(count)
    }
    return write_zip(path, files, meta)


def test_zip_labels_from_dataset_json(tmp_path: Path) -> None:
    # The labels deliberately contradict folder order: b/ is class 0, a/ class 1.
    names = [f"{'ab'[i % 2]}/{i:04d}.png" for i in range(6)]
    meta = {"labels": [[n, 1 if n.startswith("a/") else 0] for n in names]}
    ds = load_dataset(small_zip(tmp_path / "d.zip", meta))
    assert (len(ds), ds.channels, ds.resolution) == (6, 1, 8)
    assert ds.class_names == ["b", "a"]
    assert ds.labels.tolist() == [1, 1, 1, 0, 0, 0]  # sorted: a/0000, a/0002, ...
    image, label = ds[3]
    assert label == 0
    assert torch.equal(image, scaled(pixels(1, channels=1)))  # b/0001.png


def test_zip_class_names_fall_back_to_indices(tmp_path: Path) -> None:
    names = [f"{'ab'[i % 2]}/{i:04d}.png" for i in range(6)]
    meta = {"labels": [[n, i % 3] for i, n in enumerate(names)]}  # classes span dirs
    ds = load_dataset(small_zip(tmp_path / "d.zip", meta))
    assert ds.class_names == ["0", "1", "2"] and ds.num_classes == 3


def test_zip_unlabelled_and_without_dataset_json(tmp_path: Path) -> None:
    ds = load_dataset(small_zip(tmp_path / "null.zip", {"labels": None}))
    assert ds.labels is None and ds.num_classes == 0 and ds[0][1] == -1
    ds = load_dataset(small_zip(tmp_path / "plain.zip"))  # no dataset.json
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    ds = load_dataset(small_zip(tmp_path / "plain.zip"), labels="none")
    assert ds.labels is None


def test_zip_label_errors_name_the_culprit(tmp_path: Path) -> None:
    names = [f"{'ab'[i % 2]}/{i:04d}.png" for i in range(6)]
    partial = {"labels": [[n, 0] for n in names[1:]]}
    with pytest.raises(DataError, match="a/0000.png has no label"):
        load_dataset(small_zip(tmp_path / "p.zip", partial))
    extra = {"labels": [[n, 0] for n in [*names, "c/9999.png"]]}
    with pytest.raises(DataError, match="c/9999.png"):
        load_dataset(small_zip(tmp_path / "e.zip", extra))
    for bad in ({"labels": [["a/0000.png", "cat"]]}, {"labels": 3}, ["x"]):
        with pytest.raises(DataError, match="dataset.json"):
            load_dataset(small_zip(tmp_path / "b.zip", bad))


def test_zip_reads_lazily_and_names_a_corrupt_member(tmp_path: Path) -> None:
    files = {"x/0.png": encode(pixels(0)), "x/1.png": b"definitely not a png"}
    ds = load_dataset(write_zip(tmp_path / "c.zip", files))
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"c\.zip:x/1\.png"):
        ds[1]
    clone = pickle.loads(pickle.dumps(ds))  # the open archive does not travel
    assert torch.equal(clone[0][0], ds[0][0])


def test_zip_in_dataloader_workers(tmp_path: Path) -> None:
    meta = {"labels": [[f"{'ab'[i % 2]}/{i:04d}.png", i % 2] for i in range(16)]}
    ds = load_dataset(small_zip(tmp_path / "w.zip", meta, count=16))
    ds[0]  # the parent opens the archive before the workers start
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    images, labels = zip(*loader, strict=True)
    assert torch.equal(torch.cat(images), ds.images(range(16)))
    assert torch.cat(labels).tolist() == ds.labels.tolist()


# .npz files ---------------------------------------------------------------------------


def test_npz_rgb_with_labels(tmp_path: Path) -> None:
    arr = np.stack([pixels(i) for i in range(5)])
    np.savez(tmp_path / "s.npz", arr, np.array([2, 0, 2, 1, 0]))
    ds = load_dataset(tmp_path / "s.npz")
    assert (len(ds), ds.channels, ds.resolution) == (5, 3, 8)
    assert ds.class_names == ["0", "1", "2"]
    assert ds.labels.tolist() == [2, 0, 2, 1, 0] and ds[2][1] == 2
    assert torch.equal(ds[4][0], scaled(arr[4]))
    assert load_dataset(tmp_path / "s.npz", labels="none").labels is None


@pytest.mark.parametrize("shape", [(3, 8, 8), (3, 8, 8, 1)])
def test_npz_grayscale_without_labels(tmp_path: Path, shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.savez_compressed(tmp_path / "g.npz", arr)
    ds = load_dataset(tmp_path / "g.npz", resolution=4)
    assert ds.channels == 1 and ds.labels is None and ds[0][1] == -1
    assert ds.images(range(3)).shape == (3, 1, 4, 4)


@pytest.mark.parametrize(
    "arrays, culprit",
    [
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "arr_0"),
        ({"arr_0": np.zeros((2, 8, 8, 2), np.uint8)}, "arr_0"),
        ({"arr_0": np.zeros((8, 8), np.uint8)}, "arr_0"),
        ({"arr_0": np.zeros((2, 8, 8), np.uint8), "arr_1": np.zeros(3, int)}, "arr_1"),
        ({"arr_0": np.zeros((2, 8, 8), np.uint8), "arr_1": np.ones(2) / 2}, "arr_1"),
        ({"images": np.zeros((2, 8, 8), np.uint8)}, "arr_0"),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict, culprit: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=rf"bad\.npz.*{culprit}"):
        load_dataset(tmp_path / "bad.npz")


# Labels far too large: named before anything is sized by them (a class list of
# 1e9 names took a minute and gigabytes before the class-count check could run).
HUGE = [MAX_CLASSES, 10**9, 2**31, 2**63 - 1, -1, -(2**63)]


@pytest.mark.parametrize("label", HUGE)
def test_npz_labels_out_of_range_are_named(tmp_path: Path, label: int) -> None:
    labels = np.array([0, 1, label, 1], np.int64)
    np.savez(tmp_path / "big.npz", np.zeros((4, 8, 8), np.uint8), labels)
    started = time.perf_counter()
    with pytest.raises(DataError, match=re.escape(
            f"big.npz: arr_1[2] is class {label}; classes are numbered 0 to "
            f"{MAX_CLASSES - 1}")):
        load_dataset(tmp_path / "big.npz")
    assert time.perf_counter() - started < 1


def test_unsigned_npz_labels_beyond_int64_are_named(tmp_path: Path) -> None:
    labels = np.array([0, 2**64 - 1], np.uint64)  # -1 once cast to int64
    np.savez(tmp_path / "u.npz", np.zeros((2, 8, 8), np.uint8), labels)
    with pytest.raises(DataError, match=re.escape(f"arr_1[1] is class {2**64 - 1}")):
        load_dataset(tmp_path / "u.npz")
    np.savez(tmp_path / "u.npz", np.zeros((2, 8, 8), np.uint8), np.uint64([0, 6]))
    assert load_dataset(tmp_path / "u.npz").num_classes == 7  # uint64 itself is fine


@pytest.mark.parametrize("label", [*HUGE, 10**30])
def test_dataset_json_labels_out_of_range_are_named(tmp_path: Path, label: int) -> None:
    names = [f"{'ab'[i % 2]}/{i:04d}.png" for i in range(6)]
    meta = {"labels": [[n, label if i == 3 else i % 2] for i, n in enumerate(names)]}
    started = time.perf_counter()
    with pytest.raises(DataError, match=re.escape(
            f"big.zip:dataset.json: labels[3] gives b/0003.png class {label}; "
            f"classes are numbered 0 to {MAX_CLASSES - 1}")):
        load_dataset(small_zip(tmp_path / "big.zip", meta))
    assert time.perf_counter() - started < 1


def test_the_largest_class_number_is_taken(tmp_path: Path) -> None:
    labels = np.array([0, MAX_CLASSES - 1])
    np.savez(tmp_path / "top.npz", np.zeros((2, 8, 8), np.uint8), labels)
    assert load_dataset(tmp_path / "top.npz").num_classes == MAX_CLASSES


def test_damaged_npz_files_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "good.npz", np.zeros((4, 8, 8), np.uint8), np.arange(4))
    data = (tmp_path / "good.npz").read_bytes()
    damaged = {"empty": b"", "garbage": bytes(range(256)),
               "pickled": pickle.dumps({"arr_0": 1}),
               **{f"cut_{n}": data[:n] for n in (2, 40, len(data) // 2, len(data) - 1)}}
    for name, content in damaged.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
        with pytest.raises(DataError, match=f"cannot read .*{name}.npz"):
            load_dataset(tmp_path / f"{name}.npz")


# The embedded MNIST subset ------------------------------------------------------------


def test_mnist5k() -> None:
    ds = load_dataset("mnist5k")
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (5000, 1, 32, 10)
    assert ds.class_names == [str(d) for d in range(10)] and ds.source == "mnist5k"
    assert np.bincount(ds.labels).tolist() == [500] * 10
    batch = ds.images(range(0, 5000, 7))
    assert batch.shape == (715, 1, 32, 32) and batch.dtype == torch.float32
    assert batch.min() == -1 and batch.max() == 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (batch[:, :, border] == -1).all()
    assert (batch[:, :, 2:30, 2:30] > -1).any(dim=(1, 2, 3)).all()  # digits inside
    assert ds[1][1] == int(ds.labels[1])
    assert load_dataset("mnist5k", resolution=16)[0][0].shape == (1, 16, 16)
    assert load_dataset("mnist5k", channels=3)[0][0].shape == (3, 32, 32)
    assert load_dataset("mnist5k", labels="none").num_classes == 0


# Errors -------------------------------------------------------------------------------


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown data set name 'mnist6k'.*mnist5k"):
        load_dataset("mnist6k")
    with pytest.raises(DataError, match="no such file or folder.*missing"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type.*notes.txt"):
        load_dataset(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images.*empty"):
        load_dataset(tmp_path / "empty")
    write_zip(tmp_path / "textonly.zip", {"readme.txt": b"no images here"})
    with pytest.raises(DataError, match="no images.*textonly.zip"):
        load_dataset(tmp_path / "textonly.zip")
    (tmp_path / "broken.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(DataError, match="broken.zip"):
        load_dataset(tmp_path / "broken.zip")
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    with pytest.raises(DataError, match="broken.npz"):
        load_dataset(tmp_path / "broken.npz")


def test_option_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(DataError, match="labels"):
        load_dataset("mnist5k", labels="folders")
    with pytest.raises(DataError, match="labels='folder'.*s.npz"):
        load_dataset(tmp_path / "s.npz", labels="folder")
    with pytest.raises(DataError, match="channels"):
        load_dataset("mnist5k", channels=2)
    with pytest.raises(DataError, match="resolution"):
        load_dataset("mnist5k", resolution=0)


def test_unreadable_image_is_named_when_read(tmp_path: Path) -> None:
    write_images(tmp_path, ["a.png"])
    (tmp_path / "b.png").write_bytes(b"garbage")
    ds = load_dataset(tmp_path)  # only the first image is opened up front
    with pytest.raises(DataError, match="cannot read image .*b.png"):
        ds[1]
    (tmp_path / "a.png").write_bytes(encode(pixels(0))[:40])  # truncated
    with pytest.raises(DataError, match="a.png"):
        load_dataset(tmp_path)


# The shared CIFAR-10 archive ----------------------------------------------------------


@pytest.mark.skipif(not CIFAR10_TEST.exists(), reason=f"{CIFAR10_TEST} is absent")
def test_cifar10_test_zip() -> None:
    ds = load_dataset(CIFAR10_TEST)
    assert len(ds) == 10_000 and ds.num_classes == 10
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]
    assert ds.class_names[-1] == "truck"
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    image, label = ds[9_999]
    assert image.shape == (3, 32, 32) and label == 9
    assert -1 <= image.min() < image.max() <= 1


def test_any_step_s_batch_is_known_without_the_steps_before_it() -> None:
    from adm_lib.data import BatchOrder, RankBatches

    order, fresh = (BatchOrder(torch.arange(50), 8, seed=3) for _ in "ab")
    first = [order(step) for step in range(7)]
    # Fresh or after steps 0 to 6, step 7 is the same batch; and the two
    # ranks' shares, read from step 7 on, put together are the batch.
    halves = [next(iter(RankBatches(fresh, rank, 2, start=7)))
              for rank in range(2)]
    assert order(7).tolist() == fresh(7).tolist() == halves[0] + halves[1]
    # Steps 0 to 5 and two rows of step 6 are one pass over the 50 images,
    # and the next pass is shuffled anew (another seed, another order).
    one_pass = torch.cat(first[:6] + [first[6][:2]])
    assert sorted(one_pass.tolist()) == list(range(50))
    assert first[6][2:].tolist() != one_pass[:6].tolist()
    assert BatchOrder(torch.arange(50), 8, seed=4)(0).tolist() != first[0].tolist()


def test_a_rank_loader_reads_its_rows_as_uint8_from_its_step() -> None:
    from adm_lib.data import BatchOrder, rank_loader

    data = load_dataset("mnist5k", resolution=32)
    indices = torch.arange(100)
    loader, sampler = rank_loader(data, indices, 8, 0, rank=1, world_size=2, start=3)
    pixels, labels = next(iter(loader))
    rows = BatchOrder(indices, 8, 0)(3)[4:8].tolist()
    assert sampler.rows == slice(4, 8) and pixels.dtype == torch.uint8
    assert torch.equal(pixels, torch.stack([data.pixels(i)[0] for i in rows]))
    assert labels.tolist() == [data.pixels(i)[1] for i in rows]


def test_count_classes_takes_the_datas_or_a_larger_setting_and_refuses_less(
    tmp_path: Path,
) -> None:
    path = tmp_path / "four.npz"
    np.savez(path, np.zeros((8, 8, 8), np.uint8), np.arange(8) % 4)
    data = load_dataset(path)
    assert count_classes(data) == 4
    assert count_classes(data, 10) == 10  # more than it shows: a subset
    with pytest.raises(TrainError, match=re.escape(
            f"{path} has 4 classes but num_classes=3")):
        count_classes(data, 3)
    unlabelled = tmp_path / "none.npz"
    np.savez(unlabelled, np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(TrainError, match="has no labels"):
        count_classes(load_dataset(unlabelled))
