"""get_model(name, **kwargs): the TransFace ViTs and the arcface_torch CNNs (docs/method.md)."""
from utils.cli import UserError

from .iresnet import LAYERS, iresnet
from .mobilefacenet import MBF_VARIANTS, MobileFaceNet
from .vit import VisionTransformer

# All ViTs: 112x112 input, patch 9, 8 heads, MLP ratio 4. mask_ratio is honoured exactly by the model
# (keep int(N * (1 - mask_ratio)) tokens). The released code always masked 10% whenever the configured ratio was
# > 0, so the released names carry that effective 0.1 here: vit_b_dp005_mask_005 and vit_l_dp005_mask_005
# use 0.1, not the 0.05 in their names. Pass mask_ratio=... to override.
VIT_VARIANTS = {
    "vit_t": dict(embed_dim=256, depth=12, drop_path_rate=0.1, mask_ratio=0.1, using_checkpoint=False),
    "vit_t_dp005_mask0": dict(embed_dim=256, depth=12, drop_path_rate=0.05, mask_ratio=0.0, using_checkpoint=False),
    "vit_s": dict(embed_dim=512, depth=12, drop_path_rate=0.1, mask_ratio=0.1, using_checkpoint=False),
    "vit_s_dp005_mask_0": dict(embed_dim=512, depth=12, drop_path_rate=0.05, mask_ratio=0.0,
                               using_checkpoint=False),
    "vit_b": dict(embed_dim=512, depth=24, drop_path_rate=0.1, mask_ratio=0.1, using_checkpoint=True),
    "vit_b_dp005_mask_005": dict(embed_dim=512, depth=24, drop_path_rate=0.05, mask_ratio=0.1,
                                 using_checkpoint=True),
    "vit_l_dp005_mask_005": dict(embed_dim=768, depth=24, drop_path_rate=0.05, mask_ratio=0.1,
                                 using_checkpoint=True),
}
VIT_DEFAULTS = dict(img_size=112, patch_size=9, num_heads=8, mlp_ratio=4)
VIT_OVERRIDES = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "drop_path_rate", "mask_ratio",
                 "using_checkpoint", "attention_precision"}
NAMES = [*VIT_VARIANTS, *LAYERS, *MBF_VARIANTS]


def is_vit(name):
    """True for the TransFace ViTs: the backbones with the patch outputs that DPAP and EHSM use."""
    return name in VIT_VARIANTS


def get_model(name, num_features=512, fp16=False, dropout=0.0, **kwargs):
    """Build backbone `name`. `fp16` is accepted for arcface_torch compatibility and ignored: every backbone
    follows the caller's torch.autocast. `dropout` applies to the IResNets only. A wrong name or option (from a
    config or a flag) is a UserError."""
    if name not in NAMES:
        raise UserError(f"unknown backbone {name!r}; valid names: {', '.join(NAMES)}")
    if name in VIT_VARIANTS:
        unknown = set(kwargs) - VIT_OVERRIDES
        if unknown:
            raise UserError(f"unsupported ViT options {sorted(unknown)}; allowed: {sorted(VIT_OVERRIDES)}")
        return VisionTransformer(num_features=num_features, **{**VIT_DEFAULTS, **VIT_VARIANTS[name], **kwargs})
    if kwargs:
        raise UserError(f"{name} takes no options {sorted(kwargs)}")
    if name in MBF_VARIANTS:
        return MobileFaceNet(num_features=num_features, **MBF_VARIANTS[name])
    return iresnet(name, num_features=num_features, dropout=dropout)
