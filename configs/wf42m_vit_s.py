"""TransFace-S on WebFace42M (2,059,906 identities, 42,474,557 images): CosFace, Partial FC 0.3, 8 GPUs.

Source: arcface_torch recognition/arcface_torch/configs/wf42m_pfc03_40epoch_64gpu_vit_s.py (64 GPUs x 384 = global
batch 24576), here on 8 GPUs x 384 x gradient_acc 8: the same global batch and the same schedule (1728 optimiser
steps per epoch), as arcface_torch's own 8-GPU ViT-B does it.
Network: the TransFace layout of the same name as arcface_torch's (docs/training.md#webface); DPAP and
EHSM are on (the default for ViTs).
"""
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_s_dp005_mask_0"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 384
config.gradient_acc = 8  # global batch 384 x 8 GPUs x 8 = 24576
config.optimizer = "adamw"
config.lr = 1e-3
config.verbose = 2000
config.dali = False

config.rec = "/data/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
# A resumable checkpoint set every 30 minutes (not in arcface_torch; docs/training.md, "Checkpoints"): a crash loses at
# most 30 minutes of the 8 GPUs, while a save (13.7 GB on 8 ranks, bench/checkpoint.py) stalls training only for
# the copy to host memory (under a second) and is written in the background: well under 0.1 % of the time.
config.save_every_minutes = 30
