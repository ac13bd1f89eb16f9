"""Defaults for every config field. A job config (configs/<job>.py) overrides a subset of them.

The first block mirrors the released TransFace/arcface_torch base config (the release's configs/base.py); the second
holds switches this repository adds. `utils.utils_config.get_config` resolves the fields left as None.
"""
from easydict import EasyDict as edict

config = edict()

# --- released fields ---
config.margin_list = (1.0, 0.5, 0.0)  # (m1, m2, m3): ArcFace m=0.5
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = None  # None -> work_dirs/<config file stem>
config.embedding_size = 512
config.sample_rate = 1.0
config.interclass_filtering_threshold = 0.0
config.fp16 = False
config.batch_size = 128  # per process (per GPU)
config.optimizer = "sgd"  # "sgd" or "adamw"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000  # run verification every N global steps
config.frequent = 10  # log every N global steps
config.dali = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
config.rec = "synthetic"
config.num_classes = 1000
config.num_image = 100000
config.num_epoch = 20
config.warmup_epoch = 0
config.val_targets = []

# --- added by this repository ---
config.network_kwargs = {}  # extra get_model() kwargs, e.g. {"embed_dim": 64, "depth": 2}
config.amp = None  # "auto" | "fp16" | "bf16" | "none" (utils/amp.py); None -> "fp16" if fp16 else "none"
config.margin_scale = 64.0  # s of the margin softmax (hard-coded in the released train.py)
config.loss = "combined"  # "combined": ArcFace/CosFace from margin_list (released); "adaface" (docs/method.md)
config.adaface_m = 0.4  # AdaFace margin m, norm concentration h and EMA weight of the norm statistics (its paper)
config.adaface_h = 0.333
config.adaface_t_alpha = 0.01
config.dpap = None  # None -> on for ViT backbones, off for CNNs
config.dpap_top_k = 7
config.dpap_prob = 0.2
config.dpap_alpha = 1.0
config.ehsm = None  # None -> on for ViT backbones, off for CNNs
config.ehsm_gamma = 1.0
config.ehsm_measure = "std"  # "std" (released) or "gaussian" (paper's differential entropy)
config.ehsm_top_k = None  # None -> all tokens (the release's K=144 is all tokens)
config.ehsm_reduction = "mean"  # "mean" (released) or "sum" (paper figure)
config.grad_clip = 5.0
config.max_nonfinite_steps = 100  # stop when the loss stays non-finite this many steps in a row
config.export_onnx = True
config.using_wandb = False  # also log the TensorBoard scalars to Weights & Biases (pip install wandb)
config.wandb_project = None  # key: the environment's WANDB_API_KEY or `wandb login`, never a config field
config.wandb_entity = None
config.wandb_run_name = None
config.compile = False  # torch.compile the backbone (same numerics, faster steps on GPUs; docs/training.md)
# resumable checkpoints during an epoch (docs/training.md, "Checkpoints"); 0 = off: a save only at an epoch's end
# (save_all_states) and on SIGTERM/SIGINT, as released
config.save_every_steps = 0
config.save_every_minutes = 0.0  # agreed by the ranks at the logging interval (every `frequent` steps)
config.keep_checkpoints = 2  # complete checkpoint sets kept (the newest); 2 leaves one to fall back on
config.dist_timeout_minutes = 10.0  # a collective waiting longer fails (a hung or dead rank ends the job instead of
# blocking it); above the longest legitimate wait: rank 0's verification, a checkpoint save (docs/cluster.md)

# --- fine-tuning and other numbers of GPUs (docs/finetune.md, docs/training.md) ---
config.init = None  # backbone weights to start from: a released .pt, model.pt, a training checkpoint (strict load)
config.init_head = False  # also the Partial FC centres of init's training checkpoint (same class set)
config.backbone_lr_scale = 1.0  # backbone LR = lr x this (0.1 for a fine-tune; 0 freezes the backbone)
config.layer_decay = 1.0  # ViT layer-wise LR decay per block, as BEiT/MAE fine-tuning (0.75-0.9); 1.0 = off
config.reference_batch = None  # total batch lr and warm-up were tuned for; None -> this run's total batch
config.lr_scaling = "none"  # "none" | "linear" | "sqrt": lr from reference_batch to this run's total batch
