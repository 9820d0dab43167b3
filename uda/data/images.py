"""Reading images from disk, checking a split for corrupt files, and the decoded-image cache.

Every image goes through `read_image`, which decodes the whole file at once, so a truncated JPEG
fails here with the file's name instead of later inside a transform or a DataLoader worker. PIL's
`ImageFile.LOAD_TRUNCATED_IMAGES` stays False: turning it on would silently fill the missing part
of a truncated file with grey. `to_rgb` makes every decoded image upright 8-bit RGB the same way.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from uda.datasets.base import ImageRecord
from uda.errors import CorruptImageError

log = logging.getLogger(__name__)

_SKIP_HINT = "re-extract the dataset or set data.skip_corrupt=true to skip such files"


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` upright and as 8-bit RGB.

    Upright: an EXIF orientation other than 1 (a phone held sideways) is applied, as viewers do.
    8-bit: greyscale of more bits keeps its top 8, where convert("RGB") would clip every value above
    255 (a 16-bit image came out nearly all white). Mode I;16 (Pillow's 16-bit PNG and TIFF) is 16-bit.
    Mode I (32-bit int) carries no bit depth, so it is taken as the smallest of 8, 16 and 31 bits that
    holds its largest value (negatives clipped to 0): a 16-bit image whose values all stay below 256
    reads as 8-bit, brighter than meant.
    """
    if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img).astype(np.int64).clip(min=0)
        bits = 16 if img.mode != "I" else next(b for b in (8, 16, 31) if values.max(initial=0) < 2**b)
        img = Image.fromarray((values >> (bits - 8)).astype(np.uint8))
    return img.convert("RGB")


def read_image(path: str) -> Image.Image:
    """Decode the file at `path` completely into an upright RGB PIL image (`to_rgb`).

    Raises CorruptImageError (one line, naming the file and the fix) for a missing, unreadable,
    corrupt or truncated file.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(img)  # decodes every byte, so truncation surfaces here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptImageError(f"cannot read image {path} ({reason}); {_SKIP_HINT}") from None


class ImageCache:
    """The original pixels of a split, decoded once and kept in memory: path -> (H, W, 3) uint8.

    Why: the strong-baseline recipe re-reads every JPEG every epoch; decoding once moves the JPEG
    cost out of the epoch loop (Market-1501 images are 64x128, so its 12,936 training images hold
    318 MB). Pixels are kept at their original size, not resized, so train and test transforms see
    exactly the bytes `read_image` would give them.

    All pixels live in one flat uint8 buffer indexed by offsets (not one array object per image),
    so DataLoader workers forked from the main process share it without copy-on-write page copies,
    and pickling it for spawned workers is one buffer. Keyed by path, so one cache serves every
    record list over the same files (e.g. the target split relabelled after each clustering round).
    """

    def __init__(self, paths: Sequence[str], arrays: list[np.ndarray]):
        """Pack `arrays[i]` ((H_i, W_i, 3) uint8, the pixels of `paths[i]`); empties `arrays` as it goes."""
        sizes = np.array([a.size for a in arrays], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._shapes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
        self._pixels = np.empty(int(self._offsets[-1]), dtype=np.uint8)
        for i in range(len(arrays)):
            self._pixels[self._offsets[i] : self._offsets[i + 1]] = arrays[i].ravel()
            arrays[i] = None  # free each decoded image once copied: peak memory stays near 1x
        self._pixels.flags.writeable = False
        self._row = {path: i for i, path in enumerate(paths)}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, path: str) -> bool:
        return path in self._row

    def image(self, path: str) -> Image.Image:
        """The RGB image of `path`, identical to `read_image(path)`."""
        row = self._row[path]
        height, width = self._shapes[row]
        pixels = self._pixels[self._offsets[row] : self._offsets[row + 1]]
        return Image.fromarray(pixels.reshape(height, width, 3))

    @property
    def nbytes(self) -> int:
        """Bytes of pixel data held (the offsets and the path index add a little on top)."""
        return self._pixels.nbytes

    def summary(self) -> str:
        return f"decoded-image cache: {len(self)} images, {self.nbytes / 2**20:.1f} MiB"


def _decode(path: str, keep_pixels: bool) -> np.ndarray | CorruptImageError | None:
    """Worker of the thread pool: the pixels (or None when only checking), or the error to report."""
    try:
        img = read_image(path)
    except CorruptImageError as exc:
        return exc
    return np.asarray(img) if keep_pixels else None


def prepare_images(
    records: Sequence[ImageRecord],
    *,
    cache: bool,
    skip_corrupt: bool,
    num_threads: int | None = None,
) -> tuple[list[ImageRecord], ImageCache | None]:
    """The one pass each split goes through before loaders are built: returns (records kept, cache).

    cache=True decodes every image once (in a thread pool: PIL releases the GIL while decoding) and
    keeps the pixels. skip_corrupt=True must decode every image too, to know which ones fail, so it
    comes for free with the cache; corrupt files are then dropped with one warning line. With
    skip_corrupt=False the first corrupt file (in record order) raises CorruptImageError. With both
    off nothing is read here: a corrupt file raises CorruptImageError when the loader reaches it.
    """
    records = list(records)
    if not cache and not skip_corrupt:
        return records, None
    start = time.perf_counter()
    paths = [r.path for r in records]
    threads = num_threads or min(8, os.cpu_count() or 1)
    kept: list[ImageRecord] = []
    arrays: list[np.ndarray] = []
    bad: list[str] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        decoded = pool.map(_decode, paths, [cache] * len(paths))
        for record, result in zip(records, decoded):
            if isinstance(result, CorruptImageError):
                if not skip_corrupt:
                    pool.shutdown(cancel_futures=True)
                    raise result
                bad.append(record.path)
                continue
            kept.append(record)
            if cache:
                arrays.append(result)
    if bad:
        if not kept:
            raise CorruptImageError(
                f"all {len(bad)} images are unreadable (first: {bad[0]}); check the dataset path and re-extract it"
            )
        log.warning(
            "skipped %d corrupt image(s) of %d (data.skip_corrupt=true): %s%s",
            len(bad), len(records), ", ".join(bad[:3]), ", ..." if len(bad) > 3 else "",
        )
    image_cache = ImageCache([r.path for r in kept], arrays) if cache else None
    elapsed = time.perf_counter() - start
    log.info(
        "decoded %d images in %.1f s with %d threads%s",
        len(records), elapsed, threads, f"; {image_cache.summary()}" if image_cache else "",
    )
    return kept, image_cache
