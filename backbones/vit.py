"""The TransFace ViT (docs/method.md): a plain pre-norm ViT without cls token, MAE-style token masking during
training, an SE-like gate over all final tokens and a flatten+Linear/BN feature head.

Precision. The release forces CUDA fp16 autocast on inside every block, whatever the config says. Here the
blocks follow the caller's autocast instead (device-agnostic; the training loop decides fp16/bf16/none), while
the parts the release keeps in float32 stay in float32 under any outer autocast: the attention core on CUDA
(q, k, v cast to float32, autocast off; see `attention_precision` below for other devices), the patch embedding, and
everything after the blocks (final LayerNorm on x.float(), gate, std, feature head). Run the forward under torch.autocast(..., dtype=torch.float16) to get the
release's numerics; without an outer autocast the whole model is float32.
"""
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, in_chans=3):
        super().__init__()
        self.img_size = img_size
        # A stride-`patch_size` conv ignores the last img_size % patch_size rows/columns (112 = 12 * 9 + 4).
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, this ViT takes {self.img_size}x{self.img_size} images")
        return self.proj(x).flatten(2).transpose(1, 2)


ATTENTION_PRECISIONS = ("auto", "float32", "autocast")


def attention_core_in_float32(precision, device_type):
    """Whether softmax(q k^T / sqrt(head_dim)) v runs in float32 under an outer autocast.

    "float32": always, as the release does on CUDA (q, k, v cast to float32, CUDA autocast off).
    "autocast": the core follows the caller's autocast dtype like the rest of the block.
    "auto" (default): float32 on CUDA; elsewhere follow autocast. That is what the release's code does on every
    device: it turns off only CUDA autocast (torch.cuda.amp.autocast(False)), so under CPU bf16 autocast its core
    runs in bf16 (and is faster there: bench/README.md, "Attention core").
    """
    if precision not in ATTENTION_PRECISIONS:
        raise ValueError(f"attention_precision must be one of {ATTENTION_PRECISIONS}, got {precision!r}")
    return precision == "float32" or (precision == "auto" and device_type == "cuda")


class Attention(nn.Module):
    def __init__(self, dim, num_heads, precision="auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        attention_core_in_float32(precision, "cpu")  # validate early
        self.num_heads = num_heads
        self.precision = precision
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        device = x.device.type
        if not torch.is_autocast_enabled(device) or attention_core_in_float32(self.precision, device):
            q, k, v = qkv.float().unbind(0)
            with torch.autocast(device_type=device, enabled=False):
                x = F.scaled_dot_product_attention(q, k, v)
        elif device == "cuda":
            x = F.scaled_dot_product_attention(*qkv.unbind(0))  # fused flash / memory-efficient kernels
        else:
            # In bf16 on a CPU the fused kernel is slower than plain matmuls (bench/README.md, "Attention core"),
            # which are also what the release's code runs there.
            q, k, v = qkv.unbind(0)
            x = ((q @ k.transpose(-2, -1)) * (C // self.num_heads) ** -0.5).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path, attention_precision="auto"):
        super().__init__()
        # Registration order norm1, norm2, attn, mlp gives the released state_dict key order.
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attention_precision)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def random_masking(x, num_keep):
    """Keep `num_keep` random tokens per sample (argsort of uniform noise). Returns the kept tokens and the
    permutation that restores the original order once the dropped tokens are appended after the kept ones."""
    B, N, D = x.shape
    order = torch.rand(B, N, device=x.device).argsort(dim=1)
    restore = order.argsort(dim=1)
    kept = torch.gather(x, 1, order[:, :num_keep, None].expand(-1, -1, D))
    return kept, restore


class VisionTransformer(nn.Module):
    def __init__(self, img_size=112, patch_size=9, embed_dim=512, depth=12, num_heads=8, mlp_ratio=4,
                 drop_path_rate=0.0, mask_ratio=0.0, num_features=512, using_checkpoint=False,
                 attention_precision="auto"):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.mask_ratio = mask_ratio
        self.using_checkpoint = using_checkpoint
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Never used when nothing is masked: frozen, so DDP (find_unused_parameters=False) does not wait for its
        # gradient. The release's DDP search for unused parameters left its gradient None too, so AdamW never
        # touched it (no update, no weight decay); a frozen parameter keeps exactly that.
        self.mask_token.requires_grad_(mask_ratio > 0)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, rate, attention_precision)
                                     for rate in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.senet = nn.Sequential(
            nn.Linear(embed_dim * num_patches, num_patches, bias=False),
            nn.ReLU(),
            nn.Linear(num_patches, num_patches, bias=False),
            nn.Sigmoid(),
        )
        # The release's custom init covers pos_embed, mask_token and the Linears of the blocks and the
        # feature head; patch conv, BatchNorms, LayerNorms and the SE branch keep PyTorch defaults.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [*self.blocks.modules(), *self.feature.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x, return_aux=False):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.patch_embed(x.float()) + self.pos_embed
        B, N, D = x.shape
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = random_masking(x, int(N * (1 - self.mask_ratio)))
        for block in self.blocks:
            if self.using_checkpoint and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.norm(x.float())
            if masking:
                # MAE-style un-shuffle: dropped positions get the (un-normalised) mask token.
                x = torch.cat([x, self.mask_token.expand(B, N - x.shape[1], D)], dim=1)
                x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, D))
            gate = self.senet(x.reshape(B, N * D))
            x = x * gate[:, :, None]
            embedding = self.feature(x.reshape(B, N * D))
        if not return_aux:
            return embedding
        return embedding, gate.softmax(dim=1), x.std(dim=-1)
