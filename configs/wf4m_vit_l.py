"""TransFace-L on WebFace4M (205,990 identities, 4,235,242 images): CosFace, Partial FC 0.3, 8 GPUs.

Source: arcface_torch has no ViT config for WebFace4M. The recipe is its WebFace42M ViT one
(recognition/arcface_torch/configs/wf42m_pfc03_40epoch_64gpu_vit_l.py: CosFace m 0.4, Partial FC 0.3, AdamW lr 1e-3,
weight decay 0.1, fp16, 40 epochs with 4 of warm-up) at the batch of its 8-GPU run without gradient
accumulation (wf42m_pfc03_40epoch_8gpu_vit_t.py: 8 GPUs x 512 = global batch 4096, the global batch of
TransFace on MS1MV2); identity and image counts from its configs/wf4m_r100.py.
Network: the TransFace layout of the same name as arcface_torch's (docs/training.md#webface); DPAP and
EHSM are on (the default for ViTs).
"""
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "vit_l_dp005_mask_005"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.fp16 = True
config.weight_decay = 0.1
config.batch_size = 512
config.optimizer = "adamw"
config.lr = 1e-3
config.verbose = 2000
config.dali = False

config.rec = "/data/WebFace4M"
config.num_classes = 205990
config.num_image = 4235242
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
# A resumable checkpoint set every 30 minutes (not in arcface_torch; docs/training.md, "Checkpoints"): a crash loses at
# most 30 minutes of the 8 GPUs, while a save (4.5 GB on 8 ranks, bench/checkpoint.py) stalls training only for
# the copy to host memory (under a second) and is written in the background: well under 0.1 % of the time.
config.save_every_minutes = 30
