"""uda.data.device_batches: the same images as the per-image pipeline, built a whole batch at a time."""
import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tests.test_data import noise, write_image
from uda import settings
from uda.data import splits
from uda.config import load_config
from uda.data import PKSampler, read_image, test_transform
from uda.data.device_batches import BatchAugment, DeviceImages, DevicePlainLoader, DeviceTrainLoader
from uda.data.images import prepare_images
from uda.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from uda.datasets.base import ImageRecord
from uda.errors import ConfigError, UdaError

CPU = torch.device("cpu")


@pytest.fixture
def records(tmp_path) -> list[ImageRecord]:
    """24 JPEGs of mixed sizes (none at the training size 32x16): 6 identities x 4 images."""
    sizes = [(40, 20), (24, 12), (31, 17), (64, 32)]
    return [
        ImageRecord(write_image(tmp_path / f"{i:03d}.jpg", noise(*sizes[i % 4], seed=i)), i // 4, i % 3, i // 4)
        for i in range(24)
    ]


def per_image_reference(pixels: torch.Tensor, params: dict, b: int, pad: int) -> torch.Tensor:
    """What torchvision's functional ops give for sample b's parameters, one image at a time."""
    img = pixels[b].permute(2, 0, 1)
    if params["flip"][b]:
        img = TF.horizontal_flip(img)
    img = TF.crop(TF.pad(img, [pad], fill=0), int(params["top"][b]), int(params["left"][b]), *pixels.shape[1:3])
    img = TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    if params["erase_height"][b] > 0:
        box = [int(params[f"erase_{k}"][b]) for k in ("top", "left", "height", "width")]
        img = TF.erase(img, *box, torch.tensor(0.0))
    return img


def test_batch_augmentation_equals_torchvision_per_image():
    pixels = torch.from_numpy(noise(8 * 20, 10, seed=3)).reshape(8, 20, 10, 3)
    augment = BatchAugment(pad=3)
    params = augment.sample(8, 20, 10, torch.Generator().manual_seed(5))
    params["flip"][:4] = torch.tensor([True, True, False, False])  # every combination of flip and erasing
    params["erase_height"][:4], params["erase_width"][:4] = torch.tensor([0, 6, 0, 19]), torch.tensor([0, 2, 0, 9])
    params["erase_top"][:4], params["erase_left"][:4] = torch.tensor([0, 14, 0, 1]), torch.tensor([0, 8, 0, 0])
    params["top"][:2], params["left"][:2] = torch.tensor([0, 6]), torch.tensor([6, 0])  # the extreme crops
    batch = augment.apply(pixels, torch.arange(8), params)
    for b in range(8):
        assert torch.equal(batch[b], per_image_reference(pixels, params, b, pad=3)), b
    padded_corner = batch[0, :, :3, :]  # top = 0: the first 3 rows are the zero padding, normalised
    assert torch.allclose(padded_corner, (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None, None].expand_as(padded_corner))


def test_parameters_follow_the_recipe_distributions():
    """Flip rate, crop offsets over 0..2*pad, and erasing rate and box sizes as torchvision draws them."""
    n, height, width = 4000, 64, 32
    params = BatchAugment(pad=10).sample(n, height, width, torch.Generator().manual_seed(0))
    assert abs(params["flip"].float().mean().item() - 0.5) < 0.03
    for key in ("top", "left"):
        counts = torch.bincount(params[key], minlength=21)
        assert len(counts) == 21 and counts.min() > 0.6 * n / 21
    h, w = params["erase_height"].float(), params["erase_width"].float()
    erased = h > 0
    assert ((h < height) & (w < width)).all()
    assert ((params["erase_top"] + params["erase_height"] <= height) & (params["erase_left"] + params["erase_width"] <= width)).all()
    torch.manual_seed(0)
    reference = v2.RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.33), value=0)
    ones = torch.ones(1, height, width)
    boxes = []
    for _ in range(n):
        zeroed = reference(ones)[0] == 0
        rows, cols = zeroed.any(1).sum().item(), zeroed.any(0).sum().item()
        boxes.append((rows, cols))
    ref_h, ref_w = torch.tensor(boxes, dtype=torch.float32).T
    assert abs(erased.float().mean() - (ref_h > 0).float().mean()) < 0.04
    assert abs(h[erased].mean() - ref_h[ref_h > 0].mean()) < 1.5  # mean box height (of 64 rows)
    assert abs(w[erased].mean() - ref_w[ref_w > 0].mean()) < 1.0  # mean box width (of 32 columns)
    assert abs((h * w)[erased].mean() / (height * width) - 0.21) < 0.02  # area fraction uniform on [0.02, 0.4]


def test_stages_switch_off():
    pixels = torch.from_numpy(noise(4 * 12, 6, seed=1)).reshape(4, 12, 6, 3)
    plain = BatchAugment(pad=0, flip_p=0.0, erasing_p=0.0)
    batch = plain.apply(pixels, torch.arange(4), plain.sample(4, 12, 6, torch.Generator().manual_seed(0)))
    expected = TF.normalize(TF.to_dtype(pixels.permute(0, 3, 1, 2), torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert torch.equal(batch, expected)


def test_device_images_are_what_the_test_transform_sees(records):
    kept, cache = prepare_images(records, cache=True, skip_corrupt=False, num_threads=2)
    for images in (DeviceImages.build(kept, 32, 16, CPU, cache, num_threads=2), DeviceImages.build(kept, 32, 16, CPU)):
        assert images.pixels.shape == (24, 32, 16, 3) and images.size == (32, 16)
        batches = list(DevicePlainLoader(images, records[::-1], batch_size=10))
        assert [len(b[0]) for b in batches] == [10, 10, 4]
        got = torch.cat([b[0] for b in batches])
        expected = torch.stack([test_transform(32, 16)(read_image(r.path)) for r in records[::-1]])
        assert torch.equal(got, expected)
        assert torch.cat([b[1] for b in batches]).tolist() == [r.pid for r in records[::-1]]
        assert torch.cat([b[3] for b in batches]).tolist() == list(range(24))
    with pytest.raises(ValueError, match="not among"):
        images.rows([ImageRecord("elsewhere.jpg", 0, 0, 0)])


def test_train_loader_follows_the_pk_sampler_and_is_a_function_of_seed_and_epoch(records):
    images = DeviceImages.build(records, 32, 16, CPU, num_threads=2)

    def epoch(seed: int, number: int) -> list:
        loader = DeviceTrainLoader(images, records, BatchAugment(pad=2), num_pids=3, num_instances=4, seed=seed, num_iterations=5)
        loader.sampler.set_epoch(number)
        return list(loader)

    first, again, later = epoch(0, 0), epoch(0, 0), epoch(0, 1)
    assert len(first) == 5 and all(b[0].shape == (12, 3, 32, 16) for b in first)
    sampler = PKSampler([r.pid for r in records], 3, 4, seed=0, num_iterations=5)
    sampler.set_epoch(0)
    assert torch.cat([b[3] for b in first]).tolist() == list(sampler)
    for images_, pids, camids, indices in first:
        assert pids.tolist() == [records[i].pid for i in indices] and camids.tolist() == [records[i].camid for i in indices]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], later[0][0])
    assert not torch.equal(first[0][0], epoch(1, 0)[0][0])


def test_stage_builds_device_or_loader_pipeline_from_the_config(records):
    defaults = settings.defaults()
    cfg = load_config(defaults, None, ["data.height=32", "data.width=16", "data.num_pids=3", "data.num_workers=0"])
    kept, images = splits.prepare_split(records, cfg, CPU)
    assert isinstance(images, DeviceImages) and isinstance(splits.make_train_loader(kept, cfg, images), DeviceTrainLoader)
    loader_cfg = load_config(defaults, None, ["data.pipeline=loader", "data.height=32", "data.width=16", "data.num_pids=3", "data.num_workers=0"])
    kept, cache = splits.prepare_split(records, loader_cfg, CPU)
    assert isinstance(splits.make_train_loader(kept, loader_cfg, cache, num_iterations=1), torch.utils.data.DataLoader)
    device_features = torch.cat([b[0] for b in splits.make_plain_loader(kept, cfg, images)])
    loader_features = torch.cat([b[0] for b in splits.make_plain_loader(kept, loader_cfg, cache)])
    assert torch.equal(device_features, loader_features)
    with pytest.raises(ConfigError, match="data.pipeline must be one of device, loader"):  # when the config is read
        settings.check(load_config(defaults, None, ["data.pipeline=gpu"]))


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_side_by_side_streams_draw_independently(records, pipeline):
    # adapt.py trains on a source and a target loader at once: built from one seed they would draw the
    # same P x K positions and the same flips, crops and erasing boxes for both, step after step.
    cfg = load_config(settings.defaults(), None, [f"data.pipeline={pipeline}", "data.height=32", "data.width=16", "data.num_pids=3", "data.num_workers=0"])
    kept, images = splits.prepare_split(records, cfg, CPU)

    def first_batch(stream: int):
        loader = splits.make_train_loader(kept, cfg, images, num_iterations=1, stream=stream)
        loader.sampler.set_epoch(2)
        return next(iter(loader))

    source, target, target_again = first_batch(0), first_batch(1), first_batch(1)
    assert torch.equal(target[0], target_again[0]) and torch.equal(target[3], target_again[3])
    assert not torch.equal(source[3], target[3])  # which images
    assert not torch.equal(source[0], target[0])
    assert splits.stream_seed(cfg.seed, 0) == cfg.seed  # the source stream is pretraining's
    seeds = {splits.stream_seed(seed, stream) for seed in range(4) for stream in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_batch_matches_the_cpu_computation():
    pixels = torch.from_numpy(noise(16 * 20, 10, seed=3)).reshape(16, 20, 10, 3)
    augment = BatchAugment(pad=3)
    params = augment.sample(16, 20, 10, torch.Generator(device="cuda").manual_seed(5))
    on_gpu = augment.apply(pixels.cuda(), torch.arange(16, device="cuda"), params)
    on_cpu = augment.apply(pixels, torch.arange(16), {k: v.cpu() for k, v in params.items()})
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-6)
    assert np.isfinite(on_gpu.cpu().numpy()).all()


def test_a_split_too_large_for_the_gpu_says_how_to_go_on(records, monkeypatch):
    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.Tensor, "pin_memory", out_of_memory)
    with pytest.raises(UdaError, match="data.pipeline=loader") as info:
        DeviceImages.build(records, 32, 16, torch.device("cuda"), num_threads=2)
    assert "\n" not in str(info.value) and "24 images at 32x16" in str(info.value)


def test_test_sets_stay_in_host_memory(records):
    cfg = load_config(settings.defaults(), None, ["data.height=32", "data.width=16"])
    kept, images = splits.prepare_split(records, cfg, CPU, on_host=True)
    assert images.device.type == "cpu"
    loader = splits.make_plain_loader(kept, cfg, images, CPU)
    assert loader.device == CPU and len(list(loader)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_images_give_batches_on_the_gpu(records):
    images = DeviceImages.build(records, 32, 16, CPU, num_threads=2)
    on_gpu = torch.cat([b[0].cpu() for b in DevicePlainLoader(images, records, 10, device=torch.device("cuda"))])
    on_cpu = torch.cat([b[0] for b in DevicePlainLoader(images, records, 10)])
    assert torch.allclose(on_gpu, on_cpu, atol=1e-6)
