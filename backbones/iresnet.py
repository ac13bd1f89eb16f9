"""IResNet (ArcFace's improved ResNet) with the arcface_torch state_dict layout.

The body follows the caller's autocast; the fc/features head always runs in float32 (what arcface_torch does
with fp16=True), so embeddings leave in float32.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

LAYERS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3],
          "r200": [6, 26, 60, 6], "r2060": [3, 128, 896, 3]}
# r2060 (arcface_torch's iresnet2060.py) recomputes layer2 / layer3 in 20 / 100 checkpointed segments while
# training; the other depths keep every activation.
CHECKPOINT_SEGMENTS = {"r2060": {"layer2": 20, "layer3": 100}}


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) shortcut."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    fc_scale = 7 * 7  # 112x112 input after four stride-2 stages

    def __init__(self, layers, num_features=512, dropout=0.0, checkpoint_segments=None):
        super().__init__()
        self.checkpoint_segments = checkpoint_segments or {}
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        stages = []
        for planes, blocks in zip((64, 128, 256, 512), layers):
            stage = [IBasicBlock(inplanes, planes, stride=2)]
            stage += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
        # The embedding BN only centres/scales by its running statistics and a learnt bias; its weight stays 1.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x, return_aux=False):
        if return_aux:
            raise ValueError("return_aux=True needs a ViT backbone; CNN backbones return only the embedding")
        x = self.prelu(self.bn1(self.conv1(x)))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            layer, segments = getattr(self, name), self.checkpoint_segments.get(name)
            if segments and self.training:
                x = checkpoint_sequential(layer, segments, x, use_reentrant=False)
            else:
                x = layer(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.fc(x.float()))


def iresnet(name, num_features=512, dropout=0.0):
    return IResNet(LAYERS[name], num_features=num_features, dropout=dropout,
                   checkpoint_segments=CHECKPOINT_SEGMENTS.get(name))
