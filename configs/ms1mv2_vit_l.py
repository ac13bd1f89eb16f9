"""TransFace-L on MS1MV2 (released config; 8 GPUs x 512 = global batch 4096)."""
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "vit_l_dp005_mask_005"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 1.0
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 512
config.reference_batch = 8 * config.batch_size  # the released 8 GPUs (docs/training.md)
config.optimizer = "adamw"
config.lr = 1e-3
config.verbose = 2000
config.dali = False

config.rec = "/data/faces_emore"
config.num_classes = 85742
config.num_image = 5822653
config.num_epoch = 35
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
# A resumable checkpoint set every 30 minutes (not released; docs/training.md, "Checkpoints"): a crash loses at most
# 30 minutes of the 8 GPUs, while a save (3.8 GB on 8 ranks, bench/checkpoint.py) stalls training only for the
# copy to host memory (under a second) and is written in the background: well under 0.1 % of the time.
config.save_every_minutes = 30
