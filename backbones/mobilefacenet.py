"""MobileFaceNet ("mbf") with the arcface_torch state_dict layout, 112x112 input, GDC head.

The body follows the caller's autocast; conv_sep and the GDC head run in float32 (arcface_torch's fp16 path).
"""
import torch
from torch import nn


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) -> BN, no activation."""

    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden`, 3x3 depthwise (stride), 1x1 linear projection."""

    def __init__(self, in_c, out_c, hidden, stride, residual=False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, hidden):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, hidden, stride=1, residual=True) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the 7x7 map, then Linear + BN1d to the embedding."""

    def __init__(self, num_features):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=7, groups=512),
            nn.Flatten(),
            nn.Linear(512, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x):
        return self.layers(x)


# arcface_torch's get_mbf / get_mbf_large: (blocks per stage, channel scale). Hidden widths do not scale.
MBF_VARIANTS = {"mbf": dict(blocks=(1, 4, 6, 2), scale=2), "mbf_large": dict(blocks=(2, 8, 12, 4), scale=4)}


class MobileFaceNet(nn.Module):
    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        # blocks[0] == 1 in mbf: a single grouped 3x3 conv (64 groups) instead of a residual stage.
        second = (ConvBlock(c1, c1, kernel=3, padding=1, groups=64) if blocks[0] == 1
                  else Residual(c1, blocks[0], hidden=128))
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, kernel=3, stride=2, padding=1),
            second,
            DepthWise(c1, c1, hidden=128, stride=2),
            Residual(c1, blocks[1], hidden=128),
            DepthWise(c1, c2, hidden=256, stride=2),
            Residual(c2, blocks[2], hidden=256),
            DepthWise(c2, c2, hidden=512, stride=2),
            Residual(c2, blocks[3], hidden=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(num_features)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, return_aux=False):
        if return_aux:
            raise ValueError("return_aux=True needs a ViT backbone; CNN backbones return only the embedding")
        for layer in self.layers:
            x = layer(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.conv_sep(x.float()))
