"""The README's first command: a small TransFace ViT trained on the synthetic demo faces; the whole demo (data,
training, evaluation) takes under 5 minutes on 2 CPU cores with native bf16 (bench/README.md).

Data comes from `python tools/make_demo_data.py` (tools/demo.py runs it when demo_data/ is missing).
Same method as the released configs (DPAP, EHSM, ArcFace m=0.5, AdamW, poly schedule), smaller model and data.
"""
from easydict import EasyDict as edict

config = edict()
config.network = "vit_t"
# 14-pixel patches (8x8 tokens instead of the released 9-pixel 12x12) make the step ~3x cheaper on a CPU
config.network_kwargs = {"embed_dim": 128, "depth": 4, "num_heads": 4, "patch_size": 14}
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
config.num_epoch = 12
config.warmup_epoch = 1
config.verbose = config.num_image // config.batch_size  # lfw at every epoch end (~2 s each)
config.val_targets = ["lfw"]
config.export_onnx = False  # ONNX needs extra packages; docs/export.md exports any model.pt
