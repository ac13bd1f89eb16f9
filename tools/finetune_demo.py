"""Does fine-tuning from a trained model beat training from scratch on new identities? The demo world's answer.

    python tools/finetune_demo.py                        # data, 5 trainings, 5 evaluations, one table
    python tools/finetune_demo.py --budget-epochs 1      # a smaller budget for the two short runs

The demo's training identities are split in two halves (two RecordIO folders, labels 0..N/2-1 each). configs/demo.py
is trained on half A with its own budget (the "released model" of this world), then on half B with a small budget:
fine-tuned from that model (init, no warm-up; a lower LR, a lower backbone LR, layer-wise decay) and from scratch
(the demo's LR and warm-up). All models are evaluated with eval_ijbc.py on the demo IJB-C test set, whose identities
none of them saw.
"""
import argparse
import json
import os
import sys

from prettytable import PrettyTable, TableStyle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.demo import read_result_row, total_steps  # noqa: E402
from utils.cli import run_main, run_script  # noqa: E402
from utils.recordio import IndexedRecordReader, IndexedRecordWriter, IRHeader, identity_starts, \
    insightface_layout, pack_header, unpack_header  # noqa: E402
from utils.utils_config import REPO_ROOT, get_config  # noqa: E402


def split_identities(src, out_a, out_b):
    """Write the identities of the insightface folder `src` into two such folders: the first half into `out_a`, the
    rest into `out_b`, each labelled from 0. -> (identities in A, in B, images in A, in B)."""
    with IndexedRecordReader(os.path.join(src, "train.rec"), os.path.join(src, "train.idx")) as reader:
        image_keys, num_ids = insightface_layout(reader)
        starts = identity_starts(reader, image_keys, num_ids)
        half = num_ids // 2
        counts = []
        for out, classes in ((out_a, range(half)), (out_b, range(half, num_ids))):
            os.makedirs(out, exist_ok=True)
            n_images = int(starts[classes.stop] - starts[classes.start])
            a = 1 + n_images
            with IndexedRecordWriter(os.path.join(out, "train.rec"), os.path.join(out, "train.idx")) as writer:
                writer.write_idx(0, pack_header(IRHeader(0, [a, a + len(classes)], 0, 0)))
                key, ranges = 1, []
                for new_label, label in enumerate(classes):
                    first = key
                    for old_key in range(int(starts[label]), int(starts[label + 1])):
                        header, payload = unpack_header(reader.read_idx(old_key))
                        writer.write_idx(key, pack_header(IRHeader(0, float(new_label), key, 0), payload))
                        key += 1
                    ranges.append((first, key))
                for new_label, (first, stop) in enumerate(ranges):
                    writer.write_idx(a + new_label, pack_header(IRHeader(0, [first, stop], 0, 0)))
            counts.append((len(classes), n_images))
    return counts[0][0], counts[1][0], counts[0][1], counts[1][1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--output", default="work_dirs/finetune_demo")
    parser.add_argument("--budget-epochs", type=int, default=2, help="epochs of the fine-tune and the scratch run")
    parser.add_argument("--reuse", action="store_true", help="evaluate the runs whose model.pt exists again")
    args = parser.parse_args()
    out = os.path.join(REPO_ROOT, args.output)
    if not os.path.isfile(os.path.join(REPO_ROOT, args.data, "train", "train.rec")):
        run_script([sys.executable, "tools/make_demo_data.py", "--out", args.data], REPO_ROOT)
    ids_a, ids_b, images_a, images_b = split_identities(os.path.join(REPO_ROOT, args.data, "train"),
                                                        os.path.join(out, "half_a"), os.path.join(out, "half_b"))
    print(f"half A: {ids_a} identities, {images_a} images; half B: {ids_b} identities, {images_b} images")

    common = ["val_targets=[]", "export_onnx=False"]
    half_a = [f"rec={os.path.join(args.output, 'half_a')}", f"num_classes={ids_a}", f"num_image={images_a}"]
    half_b = [f"rec={os.path.join(args.output, 'half_b')}", f"num_classes={ids_b}", f"num_image={images_b}"]
    init = [f"init={os.path.join(args.output, 'pretrain', 'model.pt')}", "warmup_epoch=0"]
    short = half_b + [f"num_epoch={args.budget_epochs}"]
    runs = [  # (row, output folder, overrides)
        ("pretrained on A (the demo's budget), not fine-tuned", "pretrain", half_a),
        ("fine-tuned on B: lr 3e-4", "finetune_lr3e-4", short + init + ["lr=3e-4"]),
        ("fine-tuned on B: lr 1e-3, backbone_lr_scale 0.1", "finetune_scale0.1",
         short + init + ["lr=1e-3", "backbone_lr_scale=0.1"]),
        ("fine-tuned on B: lr 1e-3, layer_decay 0.75", "finetune_decay0.75", short + init + ["lr=1e-3",
                                                                                              "layer_decay=0.75"]),
        ("from scratch on B: the demo's lr 1e-3 and warm-up", "scratch", short),
    ]
    table = None
    for row, name, opts in runs:
        opts = common + opts + [f"output={os.path.join(args.output, name)}"]
        cfg = get_config(os.path.join(REPO_ROOT, args.config), opts)
        steps = total_steps(cfg)
        if not (args.reuse and os.path.isfile(os.path.join(REPO_ROOT, cfg.output, "model.pt"))):
            run_script([sys.executable, "train.py", "--config", args.config, "--opts", *opts], REPO_ROOT)
        run_script([sys.executable, "eval_ijbc.py", "--model-prefix", os.path.join(cfg.output, "model.pt"),
                    "--image-path", os.path.join(args.data, "ijbc"), "--result-dir", cfg.output, "--job", "ijbc",
                    "--network", cfg.network, "--network-kwargs",
                    json.dumps(dict(cfg.network_kwargs, num_features=cfg.embedding_size)),
                    "--batch-size", "64", "--num-workers", "0"], REPO_ROOT)
        tars = read_result_row(os.path.join(REPO_ROOT, cfg.output, "ijbc", "ijbc_tar_far.csv"))
        rank1 = f'{read_result_row(os.path.join(REPO_ROOT, cfg.output, "ijbc", "ijbc_1n.csv"))["rank-1"]:.2f}'
        columns = {f"TAR@{far}": f"{tars[far]:.2f}" for far in ("0.0001", "0.001", "0.01", "0.1")}
        if table is None:
            table = PrettyTable(["model", "training steps", *columns, "rank-1"])
        table.add_row([row, steps, *columns.values(), rank1])
    print(table)
    with open(os.path.join(out, "finetune_demo.md"), "w") as handle:
        table.set_style(TableStyle.MARKDOWN)
        handle.write(table.get_string() + "\n")


if __name__ == "__main__":
    run_main(main)
