"""Partial FC's sampling step at WebFace42M size: one rank of 8 holds 257,489 of 2,059,906 centres, sample_rate 0.3.

    python bench/partial_fc_sampling.py [--num-classes 2059906] [--world-size 8] [--sample-rate 0.3]
        [--global-batch 2048] [--embedding-size 512] [--repeats 20] [--matmul-repeats 3]

Times, on rank 0's shard (a world of one with that many classes is the same computation), median over repeats:
  sample   PartialFC.sample(): positive mask, random scores, top-k, sort, label remap (the index of this step);
  gather   the sampled centres, weight.index_select(0, index) (E floats per row);
  scatter  its backward: the sampled rows' gradient into the dense (num_local, E) gradient of `weight`;
and, for scale, the step's logits matmul forward + backward against the sampled centres (3 matmuls,
6 * global_batch * E * num_sample FLOP).  The labels of the global batch are uniform over all classes (about
global_batch / world_size positives on the rank).  Also prints the bytes each part moves, the input of the GPU
projection in bench/README.md.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from losses import CombinedMarginLoss  # noqa: E402
from partial_fc import PartialFC, class_range  # noqa: E402


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-classes", type=int, default=2_059_906)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--sample-rate", type=float, default=0.3)
    parser.add_argument("--global-batch", type=int, default=2048, help="labels per step, all ranks (256 x 8)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--matmul-repeats", type=int, default=3, help="0 skips the matmul")
    args = parser.parse_args()

    start, num_local = class_range(args.num_classes, 0, args.world_size)
    head = PartialFC(CombinedMarginLoss(64.0, 1.0, 0.0, 0.4), args.embedding_size, num_local, args.sample_rate).train()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.num_classes, (args.global_batch,), generator=g) - start
    labels = torch.where(labels < num_local, labels, -1)
    index, _ = head.sample(labels)
    k, e, n = len(index), args.embedding_size, args.global_batch
    print(f"{args.num_classes:,} classes / {args.world_size} ranks: {num_local:,} centres on rank 0, "
          f"{k:,} sampled, {int((labels >= 0).sum()):,} of the {n:,} labels on the rank, E={e}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    weight = head.weight.detach()
    grad_rows = torch.randn(k, e)

    def scatter():  # what index_select's backward does: a zero dense gradient, the sampled rows added in
        torch.zeros_like(weight).index_add_(0, index, grad_rows)

    sample_ms = median_ms(lambda: head.sample(labels), args.repeats)
    gather_ms = median_ms(lambda: weight.index_select(0, index), args.repeats)
    scatter_ms = median_ms(scatter, args.repeats)
    rows = [("sample", sample_ms, 4 * num_local * 4 + 8 * k * 2),  # mask, scores (write, fill, top-k read), sort
            ("gather", gather_ms, 2 * 4 * k * e),
            ("scatter", scatter_ms, 4 * num_local * e + 3 * 4 * k * e)]
    if args.matmul_repeats:
        emb, centres = torch.randn(n, e, requires_grad=True), torch.randn(k, e, requires_grad=True)

        def matmul():
            logits = emb @ centres.T
            logits.backward(torch.ones_like(logits))

        rows.append(("matmul fwd+bwd", median_ms(matmul, args.matmul_repeats), None))
    print(f"{'part':<16}{'CPU ms':>10}{'MB moved':>10}")
    for name, ms, nbytes in rows:
        print(f"{name:<16}{ms:>10.2f}{'' if nbytes is None else f'{nbytes / 1e6:10.1f}'}")
    print(f"matmul FLOP (fwd+bwd): {6 * n * e * k / 1e9:.0f} G")


if __name__ == "__main__":
    main()
