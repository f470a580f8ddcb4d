"""Image data sets, read the way the reference implementation reads them.

Every data set here yields what guided_diffusion's ``image_datasets.py`` feeds its
models: a float32 tensor ``C x H x W`` holding ``uint8 / 127.5 - 1``, so values lie in
[-1, 1], and an integer class label (-1 when the data set has no labels).

:func:`load_dataset` accepts

* the name ``"mnist5k"``: 5,000 MNIST digits shipped in the package
  (``adm_lib/assets/mnist5k.npz``, see ``data/README.md``), zero-padded from 28x28
  to 32x32 so the border is -1 after scaling; 1 channel; 10 classes named ``"0"`` to
  ``"9"``;
* a folder of images, searched recursively, labelled by sub-folder
  (``labels="folder"``), by the reference's file-name prefix (``"filename"``:
  ``3_00012.png`` is class ``"3"``), or not at all (``"none"``);
* a ``.zip`` archive in the layout of the StyleGAN/EDM ``dataset_tool``: images
  anywhere in it, labelled by an optional ``dataset.json`` =
  ``{"labels": [["dir/img.png", 3], ...]}`` (or ``{"labels": null}``);
* an ``.npz`` with ``arr_0`` (uint8, N x H x W x C or N x H x W) and optional
  ``arr_1`` labels: the format of the reference's sampling scripts.

One class, :class:`ImageDataset`, converts colours, resizes (the reference's
:func:`center_crop_arr`) and scales; it gets raw PIL images from a small backend:
``_Folder`` and ``_Zip`` decode files on demand, ``_Arrays`` holds pixels in memory.
A data set's channels are decided by all of its images, not the first: one colour
image anywhere makes it RGB (3 channels, greyscale images converted), otherwise it
is greyscale (1 channel). Folders and zips read image headers until the first colour
one, so a colour set costs one header and a greyscale set one header per image.
Bad input raises :class:`DataError`, whose message names the file or field at fault.

A training run opens its data through :func:`open_run_data` and
:func:`count_classes`, whose errors (TrainError) name the run's settings, and reads
its batches through :func:`rank_loader`: step ``s``'s global
batch is positions ``sB`` to ``(s+1)B - 1`` of an endless sequence of seeded
shuffles (:class:`BatchOrder`), so any step's batch is known without replaying the
ones before it, and each rank reads its own rows of it (:class:`RankBatches`).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adm_lib.assets import asset
from adm_lib.errors import TrainError
from adm_lib.seeds import step_seed

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
)
LABEL_MODES = ("auto", "folder", "filename", "none")
MNIST5K_PATH = asset("mnist5k.npz")
# Class numbers in a file (.npz arr_1, dataset.json) must lie below this. A
# class list and a model's label embedding have a row per number up to the
# largest, so a label of 1e9 is gigabytes before any check of the classes
# could run; ImageNet-21k, among the largest labelled sets, has 21,841.
MAX_CLASSES = 2**20

_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class DataError(ValueError):
    """A data set that cannot be read: the message names the culprit."""


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """Resize and centre-crop to ``resolution`` squared exactly as guided_diffusion."""
    # Halve with a box filter while that stays at least twice the target size, then
    # scale the short side to `resolution` with bicubic and crop the middle.
    while min(*image.size) >= 2 * resolution:
        half = tuple(x // 2 for x in image.size)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = resolution / min(*image.size)
    size = tuple(round(x * scale) for x in image.size)
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    arr = np.array(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


class _Backend(Protocol):
    """Where an ImageDataset gets its raw images from."""

    def __len__(self) -> int: ...

    def name(self, index: int) -> str: ...

    def image(self, index: int) -> Image.Image: ...

    def channels(self) -> int: ...


def _decode(name: str, data: bytes) -> Image.Image:
    """Decode an encoded image, or raise a DataError naming it."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {name}: {e}") from e
    return image


def _channels(backend: _Backend, header: Callable[[int], Image.Image]) -> int:
    """3 if any image is in colour, else 1, from headers (stops at a colour one)."""
    for index in range(len(backend)):
        try:
            with header(index) as image:
                grey = image.mode in _GRAY_MODES
        except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, zlib.error,
                EOFError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {backend.name(index)}: {e}") from e
        if not grey:
            return 3
    return 1


class _Folder:
    """Image files under a directory, given by paths relative to it."""

    def __init__(self, root: Path, files: list[str]) -> None:
        self.root, self.files = root, files

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return str(self.root / self.files[index])

    def image(self, index: int) -> Image.Image:
        try:
            data = (self.root / self.files[index]).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image {self.name(index)}: {e}") from e
        return _decode(self.name(index), data)

    def channels(self) -> int:
        return _channels(self, lambda i: Image.open(self.root / self.files[i]))


class _Zip:
    """Image members of a zip archive, opened once per process on first use."""

    def __init__(self, path: Path, members: list[str]) -> None:
        self.path, self.members = path, members
        self._archive: zipfile.ZipFile | None = None
        self._pid = -1  # a forked DataLoader worker must not share the parent's handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None, "_pid": -1}

    def __len__(self) -> int:
        return len(self.members)

    def name(self, index: int) -> str:
        return f"{self.path}:{self.members[index]}"

    def image(self, index: int) -> Image.Image:
        try:
            if self._archive is None or self._pid != os.getpid():
                self._archive, self._pid = zipfile.ZipFile(self.path), os.getpid()
            data = self._archive.read(self.members[index])
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DataError(f"cannot read image {self.name(index)}: {e}") from e
        return _decode(self.name(index), data)

    def channels(self) -> int:
        try:
            with zipfile.ZipFile(self.path) as archive:
                return _channels(
                    self, lambda i: Image.open(archive.open(self.members[i]))
                )
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read zip archive {self.path}: {e}") from e


class _Arrays:
    """Images held in memory as uint8 N x H x W (grayscale) or N x H x W x 3."""

    def __init__(self, source: str, pixels: np.ndarray) -> None:
        self.source, self.pixels = source, pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def name(self, index: int) -> str:
        return f"{self.source}[{index}]"

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index])

    def channels(self) -> int:
        return 1 if self.pixels.ndim == 3 else 3


class ImageDataset(Dataset):
    """Images as float32 C x H x W tensors in [-1, 1] with int labels (-1: none).

    Build one with :func:`load_dataset`. ``resolution=None`` keeps the images' own
    (square) size, which all images must share; an int resizes every image that
    differs with :func:`center_crop_arr`. ``channels=None`` takes 3 if any image is in
    colour (greyscale ones are converted), else 1; 1 or 3 converts every image.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        source: str,
        labels: np.ndarray | None = None,
        class_names: list[str] | None = None,
        resolution: int | None = None,
        channels: int | None = None,
    ) -> None:
        self._backend = backend
        self.source = source
        self.labels = labels
        self.class_names = list(class_names or [])
        self.num_classes = len(self.class_names)
        first = backend.image(0)
        self.channels = channels or backend.channels()
        self._resize = resolution is not None
        if resolution is None:
            if first.width != first.height:
                raise DataError(
                    f"{backend.name(0)} is {first.width}x{first.height}, not square: "
                    "pass a resolution to resize and centre-crop the images"
                )
            resolution = first.width
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self._backend)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels, label = self.pixels(index)
        return pixels.float() / 127.5 - 1, label

    def pixels(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``index`` as a uint8 C x H x W tensor, and its label."""
        image = self._backend.image(index)
        mode = "L" if self.channels == 1 else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        res = self.resolution
        if image.size == (res, res):
            arr = np.asarray(image)
        elif self._resize:
            arr = center_crop_arr(image, res)
        else:
            raise DataError(
                f"{self._backend.name(index)} is {image.width}x{image.height} but "
                f"{self.source} has {res}x{res} images: pass a resolution to resize"
            )
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        label = -1 if self.labels is None else int(self.labels[index])
        # A copy: PIL's buffer is read-only, and a batch may be written to.
        return torch.from_numpy(np.array(arr, np.uint8, order="C")), label

    def name(self, index: int) -> str:
        """Where image ``index`` comes from: a file, an archive member, an array row."""
        return self._backend.name(index)

    def images(self, indices: Iterable[int]) -> torch.Tensor:
        """Return the images at ``indices`` as one N x C x H x W batch."""
        return torch.stack([self[i][0] for i in indices])

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.source!r}: {len(self)} images, "
            f"{self.channels}x{self.resolution}x{self.resolution}, "
            f"{self.num_classes} classes)"
        )


class Pixels(Dataset):
    """An :class:`ImageDataset` whose items are its uint8 pixels.

    A training loop moves these to the device and normalises them there:
    a quarter of float32's bytes to copy.
    """

    def __init__(self, data: ImageDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data.pixels(index)


class BatchOrder:
    """The data indices of each step's global batch: seeded epoch shuffles.

    Step s takes positions s*B to (s+1)*B - 1 of an endless sequence of
    shuffles of `indices`, so any step's batch is known without replaying the
    ones before it: a resumed run reads what an uninterrupted one would.
    """

    def __init__(self, indices: Tensor, batch_size: int, seed: int) -> None:
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self._epoch, self._order = -1, indices

    def _shuffle(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, 1, epoch))
            perm = torch.randperm(len(self.indices), generator=g)
            self._epoch, self._order = epoch, self.indices[perm]
        return self._order

    def __call__(self, step: int) -> Tensor:
        """The global batch of data indices at `step`."""
        n, parts = len(self.indices), []
        position, wanted = step * self.batch_size, self.batch_size
        while wanted:
            epoch, offset = divmod(position, n)
            part = self._shuffle(epoch)[offset : offset + wanted]
            parts.append(part)
            position, wanted = position + len(part), wanted - len(part)
        return torch.cat(parts)


class RankBatches:
    """One rank's share of each global batch, from `start` on (a sampler)."""

    def __init__(
        self, order: BatchOrder, rank: int, world_size: int, start: int
    ) -> None:
        self.order, self.start = order, start
        share = order.batch_size // world_size
        self.rows = slice(rank * share, (rank + 1) * share)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.order(step)[self.rows].tolist()
            step += 1


def rank_loader(
    data: ImageDataset,
    indices: Tensor,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    start: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, RankBatches]:
    """A rank's uint8 batches from step `start` on, and their sampler."""
    order = BatchOrder(indices, batch_size, seed)
    sampler = RankBatches(order, rank, world_size, start)
    loader = DataLoader(
        Pixels(data),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: the global one (dropout's) stays untouched.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def load_dataset(
    source: str | os.PathLike[str],
    resolution: int | None = None,
    channels: int | None = None,
    labels: str = "auto",
) -> ImageDataset:
    """Open ``"mnist5k"`` or a folder, ``.zip`` or ``.npz`` of images (see module)."""
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DataError(
            f"resolution must be a positive int or None, not {resolution!r}"
        )
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, not {channels!r}")
    if labels not in LABEL_MODES:
        raise DataError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    options = {"resolution": resolution, "channels": channels}
    if isinstance(source, str) and source in _EMBEDDED:
        return _EMBEDDED[source](labels, options)
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and len(path.parts) == 1 and not path.suffix:
            raise DataError(
                f"unknown data set name {source!r}; known names: "
                f"{', '.join(_EMBEDDED)} (or give a folder, .zip or .npz path)"
            )
        raise DataError(f"no such file or folder: {path}")
    if path.is_dir():
        return _load_folder(path, labels, options)
    if path.suffix.lower() == ".zip":
        return _load_zip(path, labels, options)
    if path.suffix.lower() == ".npz":
        return _load_npz(path, labels, options)
    raise DataError(f"unsupported file type: {path} (expected a folder, .zip or .npz)")


def open_run_data(source: str, resolution: int, in_channels: int = 0) -> ImageDataset:
    """A run's data set at ``resolution``; TrainError names the setting at fault.

    ``source`` is the run's ``data`` (or ``val_data``) setting; ``in_channels``
    0 takes the data's.
    """
    if not source:
        raise TrainError("this preset has no data set of its own: set data=PATH "
                         "(a folder, .zip or .npz)")
    try:
        data = load_dataset(source, resolution=resolution)
    except DataError as err:
        raise TrainError(f"data {source!r}: {err}") from None
    if in_channels and data.channels != in_channels:
        colour = "colour" if data.channels == 3 else "greyscale"
        raise TrainError(
            f"data {source!r} has {colour} images ({data.channels} channel(s)) "
            f"but in_channels={in_channels}: set in_channels={data.channels}, "
            "or 0 to take the data's")
    return data


def count_classes(data: ImageDataset, num_classes: int = 0) -> int:
    """The classes of a model of labelled ``data``: ``num_classes``, 0 the data's.

    A label far above the count of distinct ones is refused unless
    ``num_classes`` asks for it: it is likely a typo, and a model of that many
    classes costs gigabytes.
    """
    if data.labels is None:
        raise TrainError(f"{data.source} has no labels to count")
    if data.num_classes > num_classes > 0:
        raise TrainError(f"{data.source} has {data.num_classes} classes but "
                         f"num_classes={num_classes}")
    if num_classes:
        return num_classes
    classes = data.num_classes
    distinct = len(np.unique(data.labels))
    if classes > 100_000 or classes > 2 * distinct + 16:
        top = int(np.argmax(data.labels))
        raise TrainError(
            f"{data.name(top)} has label {classes - 1}, but {data.source} has "
            f"{distinct} distinct labels: that makes a {classes}-class model; "
            f"if that is meant, set num_classes={classes}")
    return classes


def _is_image(name: str) -> bool:
    """Whether a file name has an image extension (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _labels_from_paths(
    paths: list[str], mode: str, name: Callable[[str], str]
) -> tuple[np.ndarray | None, list[str]]:
    """Label relative ``/``-separated paths by sub-folder or file-name prefix."""
    if mode == "auto":
        if all("/" in p for p in paths):
            mode = "folder"
        elif all("_" in p.rsplit("/", 1)[-1] for p in paths):
            mode = "filename"
        else:
            mode = "none"
    if mode == "none":
        return None, []
    names = []
    for p in paths:
        base = p.rsplit("/", 1)[-1]
        if mode == "folder" and "/" not in p:
            raise DataError(f"labels='folder' but {name(p)} is not in a class folder")
        if mode == "filename" and "_" not in base:
            raise DataError(
                f"labels='filename' but {name(p)} is not named CLASS_rest "
                "(e.g. 3_00012.png)"
            )
        names.append(p.split("/", 1)[0] if mode == "folder" else base.split("_", 1)[0])
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def _load_folder(path: Path, labels: str, options: dict) -> ImageDataset:
    """A folder of image files, searched recursively."""
    files = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if _is_image(p.name) and p.is_file()
    )
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
    label_array, classes = _labels_from_paths(files, labels, lambda p: str(path / p))
    return ImageDataset(
        _Folder(path, files),
        source=str(path),
        labels=label_array,
        class_names=classes,
        **options,
    )


def _load_zip(path: Path, labels: str, options: dict) -> ImageDataset:
    """A dataset_tool zip; ``labels="auto"`` reads dataset.json if it has one."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            meta = archive.read("dataset.json") if "dataset.json" in names else None
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"cannot read zip archive {path}: {e}") from e
    members = sorted(n for n in names if _is_image(n) and not n.endswith("/"))
    if not members:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}")
    if labels == "auto" and meta is not None:
        label_array, classes = _labels_from_json(path, meta, members)
    else:
        label_array, classes = _labels_from_paths(
            members, labels, lambda m: f"{path}:{m}"
        )
    return ImageDataset(
        _Zip(path, members),
        source=str(path),
        labels=label_array,
        class_names=classes,
        **options,
    )


def _labels_from_json(
    path: Path, meta: bytes, members: list[str]
) -> tuple[np.ndarray | None, list[str]]:
    """Labels from a dataset.json; classes named after folders where unambiguous."""
    where = f"{path}:dataset.json"
    try:
        entries = json.loads(meta)["labels"]
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{where}: expected an object with a 'labels' field") from e
    if entries is None:
        return None, []
    if not isinstance(entries, list):
        raise DataError(f"{where}: 'labels' must be a list or null")
    table = {}
    for k, entry in enumerate(entries):
        ok = isinstance(entry, list) and len(entry) == 2
        if not (ok and isinstance(entry[0], str) and type(entry[1]) is int):
            raise DataError(f'{where}: labels[{k}] is not ["path", int]: {entry!r}')
        if not 0 <= entry[1] < MAX_CLASSES:
            raise DataError(
                f"{where}: labels[{k}] gives {entry[0]} class {entry[1]}; "
                f"classes are numbered 0 to {MAX_CLASSES - 1}"
            )
        table[entry[0]] = entry[1]
    missing = [m for m in members if m not in table]
    if missing:
        raise DataError(
            f"{path}:{missing[0]} has no label in dataset.json "
            f"({len(missing)} images without one)"
        )
    extra = sorted(set(table) - set(members))
    if extra:
        raise DataError(f"{where} labels {extra[0]!r}, not an image in the archive")
    label_array = np.array([table[m] for m in members], dtype=np.int64)
    num_classes = int(label_array.max()) + 1
    folders: dict[int, set[str | None]] = {}
    for m, c in zip(members, label_array.tolist(), strict=True):
        folders.setdefault(c, set()).add(m.split("/", 1)[0] if "/" in m else None)
    names = [
        next(iter(folders[c])) if len(folders.get(c, ())) == 1 else None
        for c in range(num_classes)
    ]
    if None in names or len(set(names)) != num_classes:
        names = [str(c) for c in range(num_classes)]
    return label_array, names


def _check_array_label_mode(source: str, labels: str) -> None:
    """Folder and file-name labels need paths, which arrays do not have."""
    if labels not in ("auto", "none"):
        raise DataError(f"labels={labels!r} needs a folder or zip, not {source}")


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, or a DataError naming the file.

    All are read here, so a file cut short or damaged anywhere fails at once,
    with its name, rather than later, when one of its arrays is first used.
    Nothing pickled is loaded.
    """
    path = Path(path)
    npy = np.lib.format.MAGIC_PREFIX
    try:
        with open(path, "rb") as f:
            magic = f.read(len(npy))
        if magic == npy:
            raise DataError(f"cannot read {path}: it holds one array (.npy), "
                            "not an .npz archive of named arrays")
        if not magic.startswith(b"PK"):  # not a zip: numpy would unpickle it
            raise DataError(f"cannot read {path}: " + (
                "the file is empty" if not magic else
                "not an .npz file (it is not a zip archive)"))
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {path}: not a readable .npz file "
                        f"({e})") from None


def _load_npz(path: Path, labels: str, options: dict) -> ImageDataset:
    """An .npz with uint8 images ``arr_0`` and optional labels ``arr_1``."""
    _check_array_label_mode(str(path), labels)
    arrays = read_npz(path)
    if "arr_0" not in arrays:
        raise DataError(f"{path} has no arr_0 array of images")
    pixels, file_labels = arrays["arr_0"], arrays.get("arr_1")
    shape_ok = pixels.ndim == 3 or (pixels.ndim == 4 and pixels.shape[3] in (1, 3))
    if pixels.dtype != np.uint8 or not shape_ok or len(pixels) == 0:
        raise DataError(
            f"{path}: arr_0 must be uint8 N x H x W x C (C = 1 or 3) or N x H x W "
            f"with N > 0, not {pixels.dtype} {pixels.shape}"
        )
    if pixels.ndim == 4 and pixels.shape[3] == 1:
        pixels = pixels[..., 0]
    label_array, classes = None, []
    if file_labels is not None and labels == "auto":
        if file_labels.shape != (len(pixels),) or file_labels.dtype.kind not in "iu":
            raise DataError(
                f"{path}: arr_1 must hold {len(pixels)} integer labels, "
                f"not {file_labels.dtype} {file_labels.shape}"
            )
        # Checked before anything is sized by the largest label.
        bad = np.flatnonzero((file_labels < 0) | (file_labels >= MAX_CLASSES))
        if len(bad):
            raise DataError(
                f"{path}: arr_1[{bad[0]}] is class {file_labels[bad[0]]}; "
                f"classes are numbered 0 to {MAX_CLASSES - 1}"
            )
        label_array = file_labels.astype(np.int64)
        classes = [str(c) for c in range(int(label_array.max()) + 1)]
    return ImageDataset(
        _Arrays(str(path), pixels),
        source=str(path),
        labels=label_array,
        class_names=classes,
        **options,
    )


def _load_mnist5k(labels: str, options: dict) -> ImageDataset:
    """The embedded MNIST subset, zero-padded to 32x32."""
    _check_array_label_mode("mnist5k", labels)
    try:
        with MNIST5K_PATH.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            pixels, digits = npz["images"], npz["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read the embedded data set {MNIST5K_PATH}: {e}") from e
    pixels = np.pad(pixels, ((0, 0), (2, 2), (2, 2)))  # 28x28 -> 32x32, black border
    return ImageDataset(
        _Arrays("mnist5k", pixels),
        source="mnist5k",
        labels=digits.astype(np.int64) if labels == "auto" else None,
        class_names=[str(d) for d in range(10)] if labels == "auto" else [],
        **options,
    )


_EMBEDDED: dict[str, Callable[[str, dict], ImageDataset]] = {"mnist5k": _load_mnist5k}


def worker_error(err: Exception) -> str:
    """A data loader worker's error as its own message, not a traceback.

    PyTorch re-raises a worker's exception with the worker's traceback as
    its message; the original message is the traceback's last part.
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    lines = text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    if not starts:
        return lines[-1]
    return "\n".join([lines[starts[-1]][len(prefix):],
                      *lines[starts[-1] + 1:]])
