"""Parameters and GFLOPs of every backbone at 112x112, measured with torch's FlopCounterMode.

Convention: GFLOPs = multiply-accumulates / 1e9 (FlopCounterMode's FLOPs / 2), the "FLOPs" of most face-recognition
papers and of the release's README. Counted: convolutions, matmuls/linears and the attention core (q k^T and attn v);
normalisations, activations and softmax are not. FlopCounterMode counts the CUDA SDPA kernels itself but not the
CPU fused kernel, so that one is added here with torch's own SDPA formula.

    python tools/flops.py [--names vit_s_dp005_mask_0 r50 ...] [--markdown]
"""
import argparse
import os
import sys

import torch
from prettytable import PrettyTable, TableStyle
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from backbones import NAMES, get_model  # noqa: E402
from utils.cli import run_main  # noqa: E402

CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs:
            sdpa_flop_count(query_shape, key_shape, value_shape)}


def measure(model, img_size=112):
    """(parameters, multiply-accumulates) of one forward of a single image through `model` (eval mode, CPU)."""
    model = model.eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(torch.zeros(1, 3, img_size, img_size))
    return params, counter.get_total_flops() // 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=NAMES, choices=NAMES, metavar="NAME",
                        help=f"backbones to measure (default: all): {', '.join(NAMES)}")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    table = PrettyTable(["backbone", "params (M)", "GFLOPs (MACs)"], align="r")
    table.align["backbone"] = "l"
    if args.markdown:
        table.set_style(TableStyle.MARKDOWN)
    for name in args.names:
        params, macs = measure(get_model(name))
        table.add_row([name, f"{params / 1e6:.2f}", f"{macs / 1e9:.2f}"])
    print(table)


if __name__ == "__main__":
    run_main(main)
