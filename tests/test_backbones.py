import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backbones.vit as vit_module
from backbones import NAMES, get_model, is_vit
from backbones.vit import Attention


def tiny_vit(**overrides):
    kwargs = dict(embed_dim=32, depth=2, num_heads=4, num_features=16, drop_path_rate=0.0, mask_ratio=0.0)
    return get_model("vit_t", **{**kwargs, **overrides})


# The released checkpoint layout as data: (key, shape) in state_dict order. D = embed_dim, F = num_features,
# N = 144 tokens, 9x9 patches; every block has the same 11 entries.
BLOCK_TABLE = [
    ("norm1.weight", ("D",)), ("norm1.bias", ("D",)), ("norm2.weight", ("D",)), ("norm2.bias", ("D",)),
    ("attn.qkv.weight", ("3D", "D")), ("attn.proj.weight", ("D", "D")), ("attn.proj.bias", ("D",)),
    ("mlp.fc1.weight", ("4D", "D")), ("mlp.fc1.bias", ("4D",)), ("mlp.fc2.weight", ("D", "4D")),
    ("mlp.fc2.bias", ("D",)),
]
HEAD_TABLE = [
    ("pos_embed", (1, "N", "D")), ("mask_token", (1, 1, "D")),
    ("patch_embed.proj.weight", ("D", 3, 9, 9)), ("patch_embed.proj.bias", ("D",)),
]
TAIL_TABLE = [
    ("norm.weight", ("D",)), ("norm.bias", ("D",)),
    ("feature.0.weight", ("D", "ND")),
    ("feature.1.weight", ("D",)), ("feature.1.bias", ("D",)), ("feature.1.running_mean", ("D",)),
    ("feature.1.running_var", ("D",)), ("feature.1.num_batches_tracked", ()),
    ("feature.2.weight", ("F", "D")),
    ("feature.3.weight", ("F",)), ("feature.3.bias", ("F",)), ("feature.3.running_mean", ("F",)),
    ("feature.3.running_var", ("F",)), ("feature.3.num_batches_tracked", ()),
    ("senet.0.weight", ("N", "ND")), ("senet.2.weight", ("N", "N")),
]


def reference_layout(D, depth, F=512, N=144):
    sizes = {"D": D, "3D": 3 * D, "4D": 4 * D, "F": F, "N": N, "ND": N * D}
    rows = HEAD_TABLE + [(f"blocks.{i}.{key}", shape) for i in range(depth) for key, shape in BLOCK_TABLE]
    rows += TAIL_TABLE
    return [(key, tuple(sizes.get(s, s) for s in shape)) for key, shape in rows]


def random_state_dict(layout):
    return {key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape)
            for key, shape in layout}


@pytest.mark.parametrize("name, D, depth, num_keys", [
    ("vit_s_dp005_mask_0", 512, 12, 152), ("vit_b_dp005_mask_005", 512, 24, 284),
    ("vit_l_dp005_mask_005", 768, 24, 284)])
def test_vit_state_dict_layout_equals_reference_table(name, D, depth, num_keys):
    with torch.device("meta"):
        model = get_model(name)
    layout = reference_layout(D, depth)
    assert len(layout) == num_keys
    assert [(key, tuple(value.shape)) for key, value in model.state_dict().items()] == layout
    dtypes = {key: value.dtype for key, value in model.state_dict().items()}
    assert all(dtypes[key] == (torch.int64 if key.endswith("num_batches_tracked") else torch.float32)
               for key in dtypes)


@pytest.mark.parametrize("name, D, depth", [("vit_s_dp005_mask_0", 512, 12), ("vit_l_dp005_mask_005", 768, 24)])
def test_released_layout_loads_strictly(name, D, depth):
    state = random_state_dict(reference_layout(D, depth))
    model = get_model(name)  # a real CPU build: vit_l is ~1.1 GB of parameters, plus 1.1 GB for `state`
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


PARAMS = {"vit_t": 24_466_944, "vit_t_dp005_mask0": 24_466_944, "vit_s": 86_660_864,
          "vit_s_dp005_mask_0": 86_660_864, "vit_b": 124_471_040, "vit_b_dp005_mask_005": 124_471_040,
          "vit_l_dp005_mask_005": 271_630_336}


@pytest.mark.parametrize("name", list(PARAMS))
def test_vit_parameter_counts(name):
    with torch.device("meta"):
        model = get_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert model.num_patches == 144 and model.img_size == 112 and model.patch_size == 9


def iresnet_params(layers, F=512):
    """Parameter count of an arcface_torch IResNet written out by hand: stem, blocks (bn1 conv1 bn2 prelu conv2
    bn3, plus a 1x1 conv + BN shortcut in each stage's first block), bn2, fc (with bias), features BN1d."""
    bn = lambda c: 2 * c  # noqa: E731
    block = lambda i, p: bn(i) + 9 * i * p + bn(p) + p + 9 * p * p + bn(p)  # noqa: E731
    n, inplanes = 27 * 64 + bn(64) + 64, 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        n += block(inplanes, planes) + inplanes * planes + bn(planes) + (blocks - 1) * block(planes, planes)
        inplanes = planes
    return n + bn(512) + 512 * 49 * F + F + bn(F)


def mbf_params(blocks, scale, F=512):
    """Parameter count of arcface_torch's MobileFaceNet (get_mbf / get_mbf_large) written out by hand."""
    conv = lambda i, o, k=1, g=1: k * k * i // g * o + 3 * o  # conv + BN + PReLU  # noqa: E731
    linear = lambda i, o, k=1, g=1: k * k * i // g * o + 2 * o  # conv + BN  # noqa: E731
    dw = lambda i, o, h: conv(i, h) + conv(h, h, 3, h) + linear(h, o)  # noqa: E731
    c1, c2 = 64 * scale, 128 * scale
    n = conv(3, c1, 3) + (conv(c1, c1, 3, 64) if blocks[0] == 1 else blocks[0] * dw(c1, c1, 128))
    n += dw(c1, c1, 128) + blocks[1] * dw(c1, c1, 128) + dw(c1, c2, 256) + blocks[2] * dw(c2, c2, 256)
    n += dw(c2, c2, 512) + blocks[3] * dw(c2, c2, 256)
    return n + conv(c2, 512) + linear(512, 512, 7, 512) + 512 * F + 2 * F


# Every name the release's get_model accepts, with its parameter count (F=512) and state_dict size.
CNN_PARAMS = {"r18": (24_025_600, 187), "r34": (34_139_328, 331), "r50": (43_590_848, 475),
              "r100": (65_156_160, 925), "r200": (118_833_920, 1807), "r2060": (1_122_301_120, 18583),
              "mbf": (2_059_520, 333), "mbf_large": (6_314_880, 606)}
CNN_SHAPES = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3],
              "r200": [6, 26, 60, 6], "r2060": [3, 128, 1024 - 128, 3]}


def test_every_release_name_is_known():
    assert sorted(NAMES) == sorted([*PARAMS, *CNN_PARAMS])
    assert len(NAMES) == 15


@pytest.fixture(scope="module")
def meta_cnns():
    with torch.device("meta"):  # r2060 is 1.1 G parameters: counted without allocating
        return {name: get_model(name) for name in CNN_PARAMS}


@pytest.mark.parametrize("name", list(CNN_PARAMS))
def test_cnn_parameter_and_key_counts(name, meta_cnns):
    model = meta_cnns[name]
    params, num_keys = CNN_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == num_keys
    if name in CNN_SHAPES:
        assert params == iresnet_params(CNN_SHAPES[name])
    else:
        assert params == mbf_params(*{"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}[name])
    # the paper-level figures: r50 43.59 M, r100 65.16 M, mbf 2.06 M
    assert {"r50": 43.59, "r100": 65.16, "mbf": 2.06}.get(name, round(params / 1e6, 2)) == round(params / 1e6, 2)


def test_r2060_checkpoints_layer2_and_layer3_in_training(meta_cnns):
    model = meta_cnns["r2060"]
    assert model.checkpoint_segments == {"layer2": 20, "layer3": 100}
    assert [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)] == [3, 128, 896, 3]
    # segmented recomputation gives the same output and gradients as the plain forward (small stand-in)
    from backbones.iresnet import IResNet
    torch.manual_seed(0)
    plain = IResNet([1, 2, 2, 1], num_features=8)
    ckpt = IResNet([1, 2, 2, 1], num_features=8, checkpoint_segments={"layer2": 2, "layer3": 2})
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 112, 112)
    outs = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        out.square().sum().backward()
        outs.append((out.detach(), model.layer2[1].conv1.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_mbf_large_layout(meta_cnns):
    model = meta_cnns["mbf_large"]
    assert [len(model.layers[i].layers) for i in (1, 3, 5, 7)] == [2, 8, 12, 4]
    assert tuple(model.layers[0].layers[0].weight.shape) == (256, 3, 3, 3)
    assert tuple(model.conv_sep.layers[0].weight.shape) == (512, 512, 1, 1)


def test_cnn_key_structure():
    with torch.device("meta"):
        r50, mbf = get_model("r50"), get_model("mbf", num_features=128)
    keys = list(r50.state_dict())
    assert list(dict.fromkeys(key.split(".")[0] for key in keys)) == [
        "conv1", "bn1", "prelu", "layer1", "layer2", "layer3", "layer4", "bn2", "fc", "features"]
    assert sorted({key.rsplit(".downsample", 1)[0] for key in keys if ".downsample." in key}) == [
        "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert [key for key in keys if key.startswith("layer1.1.")] == [
        f"layer1.1.{m}.{p}" for m, ps in [("bn1", "bn"), ("conv1", "w"), ("bn2", "bn"), ("prelu", "w"),
                                           ("conv2", "w"), ("bn3", "bn")]
        for p in (["weight"] if ps == "w" else ["weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked"])]
    assert tuple(r50.fc.weight.shape) == (512, 512 * 7 * 7) and r50.fc.bias is not None
    assert not r50.features.weight.requires_grad
    assert torch.all(get_model("r18").features.weight == 1)
    mbf_keys = list(mbf.state_dict())
    assert list(dict.fromkeys(".".join(key.split(".")[:2]) for key in mbf_keys if key.startswith("layers."))) == [
        f"layers.{i}" for i in range(8)]
    assert tuple(mbf.state_dict()["conv_sep.layers.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(mbf.state_dict()["features.layers.0.layers.0.weight"].shape) == (512, 1, 7, 7)
    assert tuple(mbf.state_dict()["features.layers.2.weight"].shape) == (128, 512)
    assert "features.layers.3.running_var" in mbf_keys


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_cnn_forward_and_no_aux(name):
    model = get_model(name, num_features=64).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 64) and out.dtype == torch.float32
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float32  # the head runs in float32 under an outer autocast
    with pytest.raises(ValueError, match="ViT"):
        model(x, return_aux=True)


def test_sdpa_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=48, num_heads=4)
    nn.init.normal_(attn.proj.bias)
    x = torch.randn(3, 10, 48)
    B, N, D, H = 3, 10, 48, 4
    q, k, v = (x @ attn.qkv.weight.T).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // H), dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(B, N, D) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)


def test_attention_core_in_float32_under_autocast(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v)

    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny_vit(attention_precision="float32").eval()
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out, weights, entropy = model(torch.randn(2, 3, 112, 112), return_aux=True)
        inner = model.blocks[0].attn.qkv(torch.randn(2, 5, 32))
    assert inner.dtype == torch.bfloat16  # the projections follow the outer autocast
    assert seen == [(torch.float32, torch.float32, torch.float32, False)] * 2
    assert out.dtype == weights.dtype == entropy.dtype == torch.float32


def test_attention_precision_follows_autocast_where_asked(monkeypatch):
    """Under CPU bf16 autocast "float32" runs the fused core on float32 q, k, v; "autocast" and "auto" (off CUDA)
    compute softmax(q k^T / sqrt(d)) v with plain bf16 matmuls. Without autocast the three settings are one model."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v):
        seen.append(q.dtype)
        return sdpa(q, k, v)

    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", recording_sdpa)
    torch.manual_seed(0)
    tokens = torch.randn(2, 10, 32)
    outputs, plain = {}, {}
    for precision in ("float32", "autocast", "auto"):
        torch.manual_seed(1)
        attn = Attention(32, 4, precision)
        seen.clear()
        with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            outputs[precision] = attn(tokens)
            if precision != "float32":
                q, k, v = attn.qkv(tokens).reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
                core = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(dim=-1) @ v
                expected = attn.proj(core.transpose(1, 2).reshape(2, 10, 32))
        assert seen == ([torch.float32] if precision == "float32" else [])
        if precision != "float32":
            assert torch.equal(outputs[precision], expected)
        with torch.no_grad():
            plain[precision] = attn(tokens)
    assert not torch.equal(outputs["float32"], outputs["autocast"])
    assert torch.equal(plain["float32"], plain["autocast"]) and torch.equal(plain["float32"], plain["auto"])
    assert vit_module.attention_core_in_float32("auto", "cuda") and not vit_module.attention_core_in_float32("auto", "cpu")
    with pytest.raises(ValueError, match="attention_precision"):
        tiny_vit(attention_precision="fp16")


def test_return_aux_matches_gate_recomputed_from_final_tokens():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    tokens = []
    model.norm.register_forward_hook(lambda module, args, output: tokens.append(output))
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        embedding, patch_weights, patch_entropy = model(x, return_aux=True)
        plain = model(x)
        (z,) = tokens[:1]
        gate = model.senet(z.flatten(1))
        gated = z * gate[:, :, None]
        expected_embedding = model.feature(gated.flatten(1))
    assert embedding.shape == (4, 16) and patch_weights.shape == (4, 144) and patch_entropy.shape == (4, 144)
    torch.testing.assert_close(patch_weights.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(patch_weights, torch.softmax(gate, dim=1))
    torch.testing.assert_close(patch_entropy, torch.std(gated, dim=-1))
    torch.testing.assert_close(embedding, expected_embedding)
    assert torch.equal(plain, embedding)


def count_tokens(model):
    counts = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
    return counts


def test_eval_mode_never_masks_and_is_deterministic():
    model = tiny_vit(mask_ratio=0.3, drop_path_rate=0.2).eval()
    counts = count_tokens(model)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    assert counts == [144] * 4


def test_training_masks_exactly_and_unshuffles_with_mask_token():
    torch.manual_seed(0)
    model = tiny_vit(depth=1, mask_ratio=0.25).train()
    captured = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: captured.setdefault("kept", args[0]))
    model.norm.register_forward_hook(lambda module, args, output: captured.setdefault("normed", output))
    model.senet.register_forward_pre_hook(lambda module, args: captured.setdefault("restored", args[0]))
    x = torch.randn(3, 3, 112, 112)
    embedding, patch_weights, patch_entropy = model(x, return_aux=True)
    assert embedding.shape == (3, 16) and patch_weights.shape == patch_entropy.shape == (3, 144)
    keep = int(144 * (1 - 0.25))
    assert captured["kept"].shape == (3, keep, 32)
    with torch.no_grad():
        full = model.patch_embed(x) + model.pos_embed
    restored = captured["restored"].reshape(3, 144, 32)
    for b in range(3):
        # Each kept token is one of the sample's own position-embedded tokens; find where it came from.
        match = (full[b][:, None] == captured["kept"][b][None]).all(dim=-1)  # [144, keep]
        source, kept_index = match.nonzero(as_tuple=True)
        assert sorted(kept_index.tolist()) == list(range(keep)) and len(set(source.tolist())) == keep
        assert torch.equal(restored[b, source], captured["normed"][b, kept_index])
        dropped = sorted(set(range(144)) - set(source.tolist()))
        assert torch.equal(restored[b, dropped], model.mask_token[0].expand(144 - keep, 32))


def test_released_names_mask_ratio_mapping():
    with torch.device("meta"):
        ratios = {name: get_model(name).mask_ratio for name in PARAMS}
        override = get_model("vit_b_dp005_mask_005", mask_ratio=0.05).mask_ratio
    assert ratios == {"vit_t": 0.1, "vit_t_dp005_mask0": 0.0, "vit_s": 0.1, "vit_s_dp005_mask_0": 0.0,
                      "vit_b": 0.1, "vit_b_dp005_mask_005": 0.1, "vit_l_dp005_mask_005": 0.1}
    assert override == 0.05


def test_gradient_checkpointing_matches_plain_forward_backward():
    model = tiny_vit(mask_ratio=0.25, drop_path_rate=0.3, using_checkpoint=False).train()
    ckpt = tiny_vit(mask_ratio=0.25, drop_path_rate=0.3, using_checkpoint=True).train()
    ckpt.load_state_dict(model.state_dict())
    counts = count_tokens(ckpt)
    x = torch.randn(4, 3, 112, 112)
    results = []
    for net in (model, ckpt):
        torch.manual_seed(1)
        out = net(x)
        out.square().sum().backward()
        results.append((out, [p.grad for p in net.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    assert len(counts) == 2 * 2  # each block ran again during backward
    with torch.device("meta"):
        assert [get_model(n).using_checkpoint for n in ("vit_s_dp005_mask_0", "vit_b", "vit_l_dp005_mask_005")] == [
            False, True, True]


def test_other_image_and_patch_size():
    model = get_model("vit_t", img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=4,
                      num_features=16).eval()
    assert model.num_patches == 64 and tuple(model.pos_embed.shape) == (1, 64, 32)
    assert tuple(model.senet[0].weight.shape) == (64, 64 * 32)
    with torch.no_grad():
        embedding, patch_weights, patch_entropy = model(torch.randn(2, 3, 64, 64), return_aux=True)
    assert embedding.shape == (2, 16) and patch_weights.shape == patch_entropy.shape == (2, 64)
    with pytest.raises(ValueError, match="64x64"):
        model(torch.randn(2, 3, 112, 112))


def test_unknown_name_and_option():
    with pytest.raises(ValueError) as error:
        get_model("vit_xxl")
    assert all(name in str(error.value) for name in NAMES)
    with pytest.raises(ValueError, match="unsupported ViT options"):
        get_model("vit_t", depht=2)


def test_fp16_and_dropout_kwargs_accepted():
    with torch.device("meta"):
        model = get_model("vit_t", fp16=True, dropout=0.1, num_features=128)
        r18 = get_model("r18", fp16=True, dropout=0.2)
    assert model.feature[3].num_features == 128 and r18.dropout.p == 0.2


@pytest.mark.parametrize("name, rate, depth", [("vit_l_dp005_mask_005", 0.05, 24), ("vit_t", 0.1, 12)])
def test_drop_path_schedule(name, rate, depth):
    with torch.device("meta"):
        model = get_model(name)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    expected = torch.linspace(0, rate, depth).tolist()
    assert [block.drop_path.drop_prob for block in model.blocks[1:]] == pytest.approx(expected[1:])


def test_initialisation():
    torch.manual_seed(0)
    model = get_model("vit_t", embed_dim=128, depth=2, num_heads=4, num_features=64)
    linears = [m for m in [*model.blocks.modules(), *model.feature.modules()] if isinstance(m, nn.Linear)]
    for linear in linears:
        assert abs(linear.weight.std().item() - 0.02) < 0.002
        assert linear.bias is None or torch.all(linear.bias == 0)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002 and abs(model.mask_token.std().item() - 0.02) < 0.01
    # The SE gate keeps PyTorch's default Linear init: uniform in +-1/sqrt(fan_in).
    bound = 1 / math.sqrt(model.senet[2].in_features)
    assert model.senet[2].weight.abs().max() <= bound and model.senet[2].weight.std() > 0.3 * bound


def test_is_vit():
    """is_vit names exactly the backbones with patch outputs (what DPAP/EHSM, the config defaults and DDP use)."""
    assert [n for n in NAMES if is_vit(n)] == ["vit_t", "vit_t_dp005_mask0", "vit_s", "vit_s_dp005_mask_0", "vit_b",
                                               "vit_b_dp005_mask_005", "vit_l_dp005_mask_005"]
    assert not any(is_vit(n) for n in ("r18", "r50", "mbf", "vit", "vit_x"))
    assert hasattr(get_model("vit_t", embed_dim=32, depth=1, num_heads=2), "patch_size")
    assert not hasattr(get_model("mbf"), "patch_size")
