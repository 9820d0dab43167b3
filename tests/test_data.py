"""uda.data: reading images, corrupt files, the decoded-image cache, transforms, dataset and loaders."""
import io
import logging

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile

import uda.data.loaders as loaders
import uda.data.transforms as transforms
from uda.data.loaders import ReIDImageDataset
from uda.data.images import prepare_images, read_image, to_rgb
from uda.datasets.base import ImageRecord
from uda.errors import CorruptImageError, DatasetError

MEAN = np.array(transforms.IMAGENET_MEAN, dtype=np.float32)
STD = np.array(transforms.IMAGENET_STD, dtype=np.float32)


def write_image(path, pixels: np.ndarray, fmt: str = "JPEG") -> str:
    Image.fromarray(pixels).save(path, fmt)
    return str(path)


def noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def records(tmp_path) -> list[ImageRecord]:
    """12 tiny JPEGs: 3 identities x 4 images, cameras 0..3, each image distinct noise."""
    return [
        ImageRecord(write_image(tmp_path / f"{pid:04d}_c{cam}_{i}.jpg", noise(16, 8, seed=10 * pid + i)), pid, cam, pid + 100)
        for i in range(12)
        for pid, cam in [(i // 4, i % 4)]
    ]


def corrupt_files(tmp_path) -> dict[str, str]:
    """A missing file, a non-image, and a JPEG cut in half."""
    buf = io.BytesIO()
    Image.fromarray(noise(64, 32, seed=0)).save(buf, "JPEG")
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return {
        "missing": str(tmp_path / "missing.jpg"),
        "garbage": str(tmp_path / "garbage.jpg"),
        "truncated": str(tmp_path / "truncated.jpg"),
    }


# --- reading images -------------------------------------------------------------------------------


def test_read_image_returns_the_exact_rgb_pixels(tmp_path):
    pixels = noise(6, 5, seed=1)
    img = read_image(write_image(tmp_path / "a.png", pixels, "PNG"))
    assert img.mode == "RGB" and img.size == (5, 6)
    assert np.array_equal(np.asarray(img), pixels)
    grey = read_image(write_image(tmp_path / "g.png", pixels[..., 0], "PNG"))
    assert grey.mode == "RGB" and np.array_equal(np.asarray(grey), np.repeat(pixels[..., :1], 3, axis=2))


def test_a_16_bit_greyscale_png_keeps_its_gradient(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values to 255: the gradient came out nearly all white."""
    levels = np.arange(256).reshape(16, 16)
    path = tmp_path / "g16.png"
    Image.fromarray((levels * 257).astype(np.uint16)).save(path)  # 0 .. 65535, top 8 bits = levels
    assert Image.open(path).mode == "I;16"
    img = np.asarray(read_image(str(path)))
    assert img.dtype == np.uint8 and np.array_equal(img, np.repeat(levels[..., None], 3, axis=2).astype(np.uint8))


@pytest.mark.parametrize("scale, bits", [(257, 16), (1, 8), (2**23 + 1, 31)])
def test_a_32_bit_integer_image_is_read_at_the_bit_depth_its_values_use(scale, bits):
    levels = np.arange(256).reshape(16, 16)
    img = np.asarray(to_rgb(Image.fromarray((levels * scale).astype(np.int32))))
    assert np.array_equal(img[..., 0], levels), bits


@pytest.mark.parametrize("orientation, upright", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_an_exif_orientation_is_applied(tmp_path, orientation, upright):
    """A camera held sideways writes the pixels as the sensor saw them and the turn in EXIF; viewers apply it."""
    pixels = noise(4, 6, seed=3)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / "turned.png"
    Image.fromarray(pixels).save(path, exif=exif)
    img = read_image(str(path))
    assert img.size == (4, 6) and np.array_equal(np.asarray(img), np.asarray(Image.fromarray(pixels).transpose(upright)))


@pytest.mark.parametrize("kind", ["missing", "garbage", "truncated"])
def test_unreadable_image_raises_one_line_naming_file_and_fix(tmp_path, kind):
    path = corrupt_files(tmp_path)[kind]
    with pytest.raises(CorruptImageError) as info:
        read_image(path)
    message = str(info.value)
    assert path in message and "skip_corrupt" in message and "\n" not in message
    assert isinstance(info.value, DatasetError)


def test_truncated_jpeg_missing_only_its_end_marker_is_caught(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(noise(32, 16, seed=2)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[:-2])
    with pytest.raises(CorruptImageError, match="truncated"):
        read_image(str(path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- prepare_images: skip_corrupt with and without the cache ----------------------------------------


def test_cache_holds_exactly_what_read_image_decodes(tmp_path):
    shapes = [(16, 8), (9, 13), (1, 1), (128, 64)]
    recs = [ImageRecord(write_image(tmp_path / f"{i}.jpg", noise(h, w, seed=i)), i, 0, i) for i, (h, w) in enumerate(shapes)]
    kept, cache = prepare_images(recs, cache=True, skip_corrupt=False, num_threads=2)
    assert kept == recs and len(cache) == 4
    assert cache.nbytes == sum(h * w * 3 for h, w in shapes)
    for r in recs:
        assert np.array_equal(np.asarray(cache.image(r.path)), np.asarray(read_image(r.path)))
    assert "4 images" in cache.summary()


@pytest.mark.parametrize("cache", [True, False])
def test_skip_corrupt_drops_bad_files_with_one_warning(tmp_path, records, caplog, cache):
    bad = corrupt_files(tmp_path)
    mixed = records[:5] + [ImageRecord(p, 0, 0, 100) for p in bad.values()] + records[5:]
    with caplog.at_level(logging.WARNING, logger="uda.data.images"):
        kept, image_cache = prepare_images(mixed, cache=cache, skip_corrupt=True, num_threads=2)
    assert kept == records
    assert (image_cache is not None) == cache
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 corrupt image(s) of 15" in warnings[0]
    assert bad["missing"] in warnings[0]


def test_without_skip_corrupt_the_first_bad_file_raises(tmp_path, records):
    bad = corrupt_files(tmp_path)
    mixed = records[:3] + [ImageRecord(bad["truncated"], 0, 0, 100), ImageRecord(bad["garbage"], 0, 0, 100)]
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        prepare_images(mixed, cache=True, skip_corrupt=False, num_threads=2)
    # with neither option nothing is read up front: the loader meets the bad file and names it
    kept, image_cache = prepare_images(mixed, cache=False, skip_corrupt=False)
    assert kept == mixed and image_cache is None
    dataset = ReIDImageDataset(kept, transforms.test_transform(32, 16))
    assert dataset[0][1] == records[0].pid
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        dataset[3]


def test_all_images_corrupt_is_an_error_even_when_skipping(tmp_path):
    bad = corrupt_files(tmp_path)
    with pytest.raises(CorruptImageError, match="all 3 images are unreadable"):
        prepare_images([ImageRecord(p, 0, 0, 0) for p in bad.values()], cache=False, skip_corrupt=True)


# --- transforms -----------------------------------------------------------------------------------


def test_test_transform_matches_hand_computation():
    colour = np.array([200, 100, 50], dtype=np.uint8)
    constant = Image.fromarray(np.broadcast_to(colour, (4, 2, 3)).copy())
    out = transforms.test_transform(8, 4)(constant)  # resizing a constant image keeps it constant
    expected = (colour / np.float32(255) - MEAN) / STD  # (200/255 - 0.485) / 0.229 = 1.3069...
    assert out.shape == (3, 8, 4) and out.dtype == torch.float32 and type(out) is torch.Tensor
    assert np.allclose(out.numpy(), expected[:, None, None], atol=1e-6)
    assert out[0, 0, 0].item() == pytest.approx((200 / 255 - 0.485) / 0.229, abs=1e-6)
    # at its own size the resize is the identity: every pixel normalised, in (C, H, W) layout
    pixels = noise(6, 3, seed=5)
    out = transforms.test_transform(6, 3)(Image.fromarray(pixels))
    assert np.allclose(out.numpy(), ((pixels / np.float32(255) - MEAN) / STD).transpose(2, 0, 1), atol=1e-6)


def test_train_transform_without_randomness_is_the_test_transform():
    img = Image.fromarray(noise(20, 9, seed=3))
    plain = transforms.train_transform(32, 16, pad=0, flip_p=0, erasing_p=0)
    assert torch.equal(plain(img), transforms.test_transform(32, 16)(img))


def test_train_transform_is_reproducible_under_a_fixed_seed():
    img = Image.fromarray(noise(20, 9, seed=3))
    augment = transforms.train_transform(32, 16)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(augment(img))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_flip_and_pad_crop_move_pixels_as_expected():
    img = Image.fromarray(noise(8, 4, seed=6))
    reference = transforms.test_transform(8, 4)(img)
    flipped = transforms.train_transform(8, 4, pad=0, flip_p=1, erasing_p=0)(img)
    assert torch.equal(flipped, reference.flip(-1))
    torch.manual_seed(0)
    shifted = transforms.train_transform(8, 4, pad=2, flip_p=0, erasing_p=0)(img)
    black = torch.tensor((0 - MEAN) / STD)[:, None, None]  # zero padding = black, normalised
    padded = black.expand(3, 12, 8).clone()
    padded[:, 2:10, 2:6] = reference
    windows = [padded[:, y : y + 8, x : x + 4] for y in range(5) for x in range(5)]
    matches = [i for i, w in enumerate(windows) if torch.allclose(shifted, w, atol=1e-6)]
    assert len(matches) == 1 and matches[0] != 2 * 5 + 2  # a shifted window, not the centred one


def test_random_erasing_zeroes_one_rectangle_within_bounds():
    white = Image.fromarray(np.full((128, 64, 3), 255, dtype=np.uint8))  # normalises to > 0 everywhere
    erase = transforms.train_transform(256, 128, pad=0, flip_p=0, erasing_p=1)
    erased = 0
    for seed in range(10):
        torch.manual_seed(seed)
        zero = (erase(white) == 0).all(dim=0)
        if not zero.any():
            continue  # torchvision gives up after 10 rectangles that do not fit
        erased += 1
        rows, cols = zero.any(dim=1).nonzero(), zero.any(dim=0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert zero.sum() == h * w  # one solid rectangle
        area = h * w / (256 * 128)
        assert 0.02 * 0.95 <= area <= 0.4 * 1.05  # rounding h and w to pixels
        assert 0.3 * 0.9 <= h / w <= 3.33 * 1.1
    assert erased >= 8


# --- dataset and loaders --------------------------------------------------------------------------


def test_dataset_items_match_records_with_and_without_cache(records):
    transform = transforms.test_transform(32, 16)
    _, cache = prepare_images(records, cache=True, skip_corrupt=False, num_threads=2)
    from_disk, from_cache = ReIDImageDataset(records, transform), ReIDImageDataset(records, transform, cache)
    for i in (0, 7, 11):
        img, pid, camid, index = from_disk[i]
        assert (pid, camid, index) == (records[i].pid, records[i].camid, i)
        assert torch.equal(img, transform(read_image(records[i].path)))
        assert torch.equal(img, from_cache[i][0])


def test_seeded_item_is_reproducible_and_leaves_the_global_rng_alone(records):
    dataset = ReIDImageDataset(records, transforms.train_transform(32, 16))
    state = torch.get_rng_state()
    first, second, other = dataset[(3, 123)][0], dataset[(3, 123)][0], dataset[(3, 124)][0]
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.equal(torch.get_rng_state(), state)


def test_test_loader_yields_every_record_in_order(records):
    transform = transforms.test_transform(32, 16)
    batches = list(loaders.test_loader(records, transform, batch_size=5, num_workers=0))
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    images, pids, camids, indices = (torch.cat(parts) for parts in zip(*batches))
    assert images.shape == (12, 3, 32, 16)
    assert indices.tolist() == list(range(12))
    assert pids.tolist() == [r.pid for r in records] and camids.tolist() == [r.camid for r in records]
    assert torch.equal(images[9], transform(read_image(records[9].path)))


def epoch_batches(loader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_train_loader_batches_are_p_by_k_and_reproducible(records):
    transform = transforms.train_transform(32, 16)
    _, cache = prepare_images(records, cache=True, skip_corrupt=False, num_threads=2)

    def make(num_workers, cache=None):
        return loaders.train_loader(records, transform, num_pids=2, num_instances=2, seed=7, num_workers=num_workers, cache=cache)

    runs = {nw: [epoch_batches(make(nw), 0) for _ in range(2)] for nw in (0, 2)}
    reference = runs[0][0]
    assert len(reference) == len(make(0)) >= 2
    for images, pids, camids, indices in reference:
        assert images.shape == (4, 3, 32, 16)
        assert pids.tolist() == [records[i].pid for i in indices] and camids.tolist() == [records[i].camid for i in indices]
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]
    for nw in (0, 2):
        for run in runs[nw]:  # same seed: identical tensors, with 0 or 2 workers alike
            assert all(torch.equal(a, b) for batch, ref in zip(run, reference) for a, b in zip(batch, ref))
    cached = epoch_batches(make(0, cache), 0)
    assert all(torch.equal(a, b) for batch, ref in zip(cached, reference) for a, b in zip(batch, ref))
    next_epoch = epoch_batches(make(0), 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(next_epoch, reference))
