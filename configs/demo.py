"""The README's first command: a small TransFace ViT trained on the synthetic demo faces in under 5 CPU minutes
(2 cores with native bf16; bench/README.md).

Data comes from `python tools/make_demo_data.py` (tools/demo.py runs it when demo_data/ is missing).
Same method as the released configs (DPAP, EHSM, ArcFace m=0.5, AdamW, poly schedule), smaller model and data.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "vit_t"
config.network_kwargs = {"embed_dim": 128, "depth": 4, "num_heads": 4}
config.embedding_size = 128
config.margin_list = (1.0, 0.5, 0.0)
config.optimizer = "adamw"
config.lr = 1e-3
config.weight_decay = 0.05
config.amp = "auto"  # bf16 on CPUs with native bf16 (and CUDA), float32 elsewhere (utils/amp.py)
config.batch_size = 64
config.num_workers = 0  # decoding 112x112 JPEGs is far cheaper than the CPU training step
config.frequent = 10
config.save_all_states = True

config.rec = "demo_data/train"
config.num_classes = 200
config.num_image = 4000
config.num_epoch = 7  # 62 steps an epoch; 12 epochs in float32 gave the same TAR@1e-3 in twice the time
config.warmup_epoch = 1
config.verbose = 434  # lfw once, after the last step
config.val_targets = ["lfw"]
