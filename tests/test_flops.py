import sys

import pytest

from backbones import get_model
from tools.flops import main, measure


@pytest.mark.parametrize("img_size, patch_size", [(112, 9), (64, 8)])
def test_measure_matches_hand_count_for_tiny_vit(img_size, patch_size):
    D, depth, F, heads = 32, 2, 16, 4
    model = get_model("vit_t", img_size=img_size, patch_size=patch_size, embed_dim=D, depth=depth,
                      num_heads=heads, num_features=F)
    N = (img_size // patch_size) ** 2
    patch = N * D * 3 * patch_size * patch_size
    # qkv, q k^T and attn v (all heads together: 2 N^2 D), proj, fc1, fc2
    block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * 4 * D
    senet = N * D * N + N * N
    feature = N * D * D + D * F
    params, macs = measure(model, img_size=img_size)
    assert macs == patch + depth * block + senet + feature
    assert params == sum(p.numel() for p in model.parameters())


def test_transface_s_matches_reported_gflops():
    params, macs = measure(get_model("vit_s_dp005_mask_0"))
    assert round(params / 1e6, 2) == 86.66
    assert macs / 1e9 == pytest.approx(5.8, rel=0.05)


def test_cli_prints_markdown_row(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["flops.py", "--names", "mbf", "--markdown"])
    main()
    rows = [line for line in capsys.readouterr().out.splitlines() if "mbf" in line]
    assert [cell.strip() for cell in rows[0].strip("|").split("|")] == ["mbf", "2.06", "0.44"]
