"""A few-minute CPU smoke run: a 2-block ViT on the synthetic source. Not a face model."""
from easydict import EasyDict as edict

config = edict()
config.network = "vit_t"
config.network_kwargs = {"embed_dim": 64, "depth": 2, "num_heads": 4}
config.embedding_size = 64
config.margin_list = (1.0, 0.5, 0.0)
config.optimizer = "adamw"
config.lr = 1e-3
config.weight_decay = 0.1
config.amp = "none"
config.batch_size = 32
config.num_workers = 0
config.frequent = 5
config.verbose = 10**9

config.rec = "synthetic"
config.num_classes = 100
config.num_image = 640
config.num_epoch = 2
config.warmup_epoch = 0
config.val_targets = []
