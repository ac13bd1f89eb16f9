"""TransFace-S on Glint360K (released config; 8 GPUs x 128 = global batch 1024)."""
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "vit_s_dp005_mask_0"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 128
config.reference_batch = 8 * config.batch_size  # the released 8 GPUs (docs/training.md)
config.optimizer = "adamw"
config.lr = 1e-4
config.verbose = 2000
config.dali = False

config.rec = "/data/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]
# A resumable checkpoint set every 30 minutes (not released; docs/training.md, "Checkpoints"): a crash loses at most
# 30 minutes of the 8 GPUs, while a save (3.3 GB on 8 ranks, bench/checkpoint.py) stalls training only for the
# copy to host memory (under a second) and is written in the background: well under 0.1 % of the time.
config.save_every_minutes = 30
