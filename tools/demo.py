"""The whole system on a CPU in minutes: make the synthetic demo faces (if absent), train a small TransFace on
them with configs/demo.py, then evaluate it with the IJB-C protocol on the held-out demo identities.

    python tools/demo.py                   # everything
    python tools/demo.py --skip-train      # evaluate the existing work_dirs/demo/model.pt again
    python tools/demo.py --opts num_epoch=2  # shorter training (any config override)
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import run_main, run_script  # noqa: E402
from utils.utils_config import REPO_ROOT, get_config  # noqa: E402


def run(command):
    run_script(command, REPO_ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--data", default="demo_data", help="where the generated data lives")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args()

    opts = [f"rec={os.path.join(args.data, 'train')}"] + args.opts
    cfg = get_config(os.path.join(REPO_ROOT, args.config), opts)
    if not os.path.isfile(os.path.join(REPO_ROOT, args.data, "train", "train.rec")):
        run([sys.executable, "tools/make_demo_data.py", "--out", args.data])
    if not args.skip_train:
        run([sys.executable, "train.py", "--config", args.config, "--opts", *opts])
    result_dir = cfg.output
    run([sys.executable, "eval_ijbc.py", "--model-prefix", os.path.join(cfg.output, "model.pt"),
         "--image-path", os.path.join(args.data, "ijbc"), "--result-dir", result_dir, "--job", "demo",
         "--network", cfg.network, "--network-kwargs", json.dumps(dict(cfg.network_kwargs, num_features=cfg.embedding_size)),
         "--batch-size", "64", "--num-workers", "0"])
    print(f"\nTAR@FAR table, scores and ROC plot: {os.path.join(result_dir, 'demo')}/")


if __name__ == "__main__":
    run_main(main)
