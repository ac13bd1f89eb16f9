"""Partial FC: the model-parallel margin-softmax head (arcface_torch's partial_fc; docs/method.md).

Rank r of W owns the contiguous block of class centres given by `class_range` and sees the embeddings and labels of
the whole global batch (all-gathered).  Each rank computes the margin logits of the global batch against its own
centres; a distributed softmax cross-entropy (all-reduce of max and sum) turns them into one loss, identical on all
ranks.  Without an initialised process group the same code is a plain full-softmax head (a world of one).

Gradient scaling: the all-gather backward sums, for every rank's chunk of the global batch, the gradients computed
on all ranks (that sum is exactly d(loss)/d(local embeddings)) and multiplies it by W.  The backbone is wrapped in
DDP, which averages gradients over the W ranks, so after DDP the backbone holds the gradient of the global-mean loss.
The centres are not in DDP: their gradient is d(loss)/d(weight) as is.

Training-loop contract:
    head = PartialFC(margin_loss, embedding_size, num_classes, sample_rate, amp_dtype).to(device)
    optimizer = ...(params including head.parameters())
    head.register_optimizer(optimizer)          # once; needed for sample_rate < 1, harmless otherwise
    loss = head(embeddings, labels, sample_weights)   # same global batch size on every rank, every step
    loss.backward(); optimizer.step() (or scaler.step(optimizer)); optimizer.zero_grad()

With sample_rate < 1 only a subset of centres enters the softmax each step.  `weight` stays the one full Parameter
the optimiser knows (so its state_dict and the optimiser's state keep one stable key); the rows used since the last
step are marked in the `sampled` buffer, and hooks that `register_optimizer` installs on the optimiser copy the
unsampled rows of `weight` and of every optimiser state tensor of weight's shape (momentum buffer, exp_avg,
exp_avg_sq, ...) before `optimizer.step()` and write them back after it.  Unsampled centres therefore see no weight
decay, momentum or Adam update at all.  A state tensor the optimiser creates during that step gets zeros in the
unsampled rows (its "no history" value).  The scalar Adam `step` counter is per tensor, so it counts all steps.
The mask is cleared after each step and by a forward that finds `weight.grad is None` (zero_grad ran), so gradient
accumulation marks the union of its micro-batches and a step skipped by GradScaler leaks nothing into the next one.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from utils.distributed import is_initialized, rank_and_world_size


def class_range(num_classes, rank, world_size):
    """(class_start, num_local) of `rank`: the first C mod W ranks get one extra class."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def shard_for_rank(full, rank, world_size):
    """The rows of a full (C, ...) tensor (centres or a per-centre optimiser state) that `rank` of `world_size` owns."""
    start, num_local = class_range(full.shape[0], rank, world_size)
    return full[start:start + num_local].clone()


def merge_shards(shards):
    """Concatenate the shards saved by ranks 0..W-1 (in rank order) back into the full (C, ...) tensor."""
    num_classes = sum(s.shape[0] for s in shards)
    sizes = [s.shape[0] for s in shards]
    expected = [class_range(num_classes, r, len(shards))[1] for r in range(len(shards))]
    if sizes != expected:
        raise ValueError(f"shard sizes {sizes} are not the {len(shards)}-rank sharding of {num_classes} classes "
                         f"(expected {expected}); pass the shards of all ranks in rank order")
    return torch.cat(shards, dim=0)


class AllGatherWithGrad(torch.autograd.Function):
    """All-gather (B, E) from every rank into (W*B, E); backward reduce-scatters the gradient and multiplies it by W
    (see the module docstring for why W)."""

    @staticmethod
    def forward(ctx, tensor):
        world_size = dist.get_world_size()
        chunks = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad):
        world_size = dist.get_world_size()
        chunks = list(grad.contiguous().chunk(world_size, dim=0))
        local = torch.empty_like(chunks[0])
        dist.reduce_scatter(local, chunks, op=dist.ReduceOp.SUM)
        return local * world_size


def _all_gather(tensor):
    """All-gather without gradient (labels, EHSM weights)."""
    chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, tensor.contiguous())
    return torch.cat(chunks, dim=0)


class DistSoftmaxCrossEntropy(torch.autograd.Function):
    """loss = -(1/N) sum_b w_b log max(p_{b,y_b}, 1e-30), p the softmax over the classes of all ranks.

    logits (N, C_local) float32, labels (N,) column of the target on this rank or -1, weights (N,) constants.
    """

    @staticmethod
    def forward(ctx, logits, labels, weights):
        distributed = is_initialized()
        max_logit = logits.amax(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(max_logit, dist.ReduceOp.MAX)
        prob = logits - max_logit
        prob.exp_()
        sum_exp = prob.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(sum_exp, dist.ReduceOp.SUM)
        prob.div_(sum_exp)
        on_rank = labels >= 0
        target = labels.clamp(min=0).unsqueeze(1)
        # p_y lives on the owning rank only; the sum over ranks gives every rank all of them.
        prob_target = torch.where(on_rank, prob.gather(1, target).squeeze(1), 0.0)
        if distributed:
            dist.all_reduce(prob_target, dist.ReduceOp.SUM)
        loss = -(weights * prob_target.clamp(min=1e-30).log()).sum() / logits.shape[0]
        ctx.save_for_backward(prob, target, on_rank, weights)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        prob, target, on_rank, weights = ctx.saved_tensors
        row_scale = weights * grad_loss / prob.shape[0]
        grad = prob * row_scale.unsqueeze(1)
        grad.scatter_add_(1, target, torch.where(on_rank, -row_scale, 0.0).unsqueeze(1))
        return grad, None, None


class PartialFC(nn.Module):
    """Margin-softmax head with class centres sharded over the ranks.

    margin_loss: module mapping (cos logits (N, C_sel) in [-1, 1], labels (N,) column or -1, feature norms (N,) of the
    global batch) -> scaled logits, e.g. losses.CombinedMarginLoss or losses.AdaFaceLoss.
    amp_dtype: None (fp32) or torch.float16 / torch.bfloat16 for the logits matmul.
    forward(local_embeddings (B, E), local_labels (B,), sample_weights=None or (B,) local EHSM weights) -> scalar
    loss, the same on all ranks.  See the module docstring for the training-loop contract.
    """

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, amp_dtype=None):
        super().__init__()
        rank, world_size = rank_and_world_size()
        if num_classes < world_size:
            raise ValueError(f"num_classes={num_classes} is smaller than the world size {world_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.amp_dtype = amp_dtype
        self.class_start, self.num_local = class_range(num_classes, rank, world_size)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        # Rows of `weight` used by a forward with grad since the last optimiser step (sample_rate < 1 only).
        self.register_buffer("sampled", torch.zeros(self.num_local, dtype=torch.bool), persistent=False)

    def sample(self, labels):
        """Pick the centres for this step: every positive class of the global batch plus random negatives,
        as a sorted index; returns (index, labels remapped to positions in index, -1 kept)."""
        on_rank = labels >= 0
        # The positives as a mask filled through a tensor index (off-rank labels go to a spare last row), not
        # torch.unique: no data-dependent shape, so no host sync.  A global batch has at most labels.numel()
        # positives: when num_sample covers that (in practice always: 77,246 sampled vs a 2,048 batch at WebFace42M
        # size) they always fit and are never counted.
        is_positive = torch.zeros(self.num_local + 1, dtype=torch.bool, device=labels.device)
        is_positive = is_positive.index_fill_(0, torch.where(on_rank, labels, self.num_local), True)[:-1]
        index = None
        if self.num_sample < labels.numel():  # a small shard: the count decides the size (a host sync)
            positives = is_positive.nonzero().squeeze(1)
            if positives.numel() > self.num_sample:  # more positives than num_sample: all of them, no negatives
                index = positives
        if index is None:
            scores = torch.rand(self.num_local, device=labels.device).masked_fill_(is_positive, 2.0)
            index = scores.topk(self.num_sample).indices.sort().values
        remapped = torch.searchsorted(index, labels.clamp(min=0))
        return index, torch.where(on_rank, remapped, -1)

    def forward(self, local_embeddings, local_labels, sample_weights=None):
        if sample_weights is None:
            sample_weights = torch.ones(local_labels.shape[0], device=local_embeddings.device)
        embeddings = local_embeddings.float()
        labels = local_labels.long()
        weights = sample_weights.detach().float()
        if is_initialized():
            embeddings = AllGatherWithGrad.apply(embeddings)
            labels = _all_gather(labels)
            weights = _all_gather(weights)

        labels = labels - self.class_start
        labels = torch.where((labels >= 0) & (labels < self.num_local), labels, -1)
        weight = self.weight
        if self.sample_rate < 1.0 and self.training:
            index, labels = self.sample(labels)
            weight = weight.index_select(0, index)
            if torch.is_grad_enabled():
                if self.weight.grad is None:  # a new gradient accumulation started (zero_grad ran)
                    self.sampled.zero_()
                self.sampled[index] = True

        device_type = embeddings.device.type
        # Only the matmul runs in low precision (never an outer autocast's choice); margin and softmax in fp32.
        with torch.autocast(device_type=device_type, enabled=False):
            norm_embeddings = F.normalize(embeddings)
            norm_weight = F.normalize(weight)
            with torch.autocast(device_type=device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = F.linear(norm_embeddings, norm_weight)
            logits = logits.float().clamp(-1, 1)
            # the norms of the un-normalised global-batch embeddings (AdaFace's margin depends on them; no gradient)
            logits = self.margin_loss(logits, labels, embeddings.detach().norm(dim=1))
            return DistSoftmaxCrossEntropy.apply(logits, labels, weights)

    def register_optimizer(self, optimizer):
        """Install step hooks on `optimizer` so that unsampled centres and their optimiser state never change.
        Call once after building the optimiser.  No-op for sample_rate == 1.  Skipped steps (GradScaler) run no
        hooks and change nothing."""
        if self.sample_rate >= 1.0:
            return
        saved = {}

        def state_tensors():
            state = optimizer.state.get(self.weight, {})
            tensors = {key: value for key, value in state.items()
                       if torch.is_tensor(value) and value.shape == self.weight.shape}
            tensors["weight"] = self.weight.data
            return tensors

        @torch.no_grad()
        def save_unsampled(opt, args, kwargs):
            rows = (~self.sampled).nonzero().squeeze(1)
            saved.clear()
            saved["rows"] = rows
            saved["values"] = {key: value.index_select(0, rows) for key, value in state_tensors().items()}

        @torch.no_grad()
        def restore_unsampled(opt, args, kwargs):
            rows, values = saved.pop("rows"), saved.pop("values")
            for key, tensor in state_tensors().items():
                if key in values:
                    tensor.index_copy_(0, rows, values[key])
                else:
                    tensor.index_fill_(0, rows, 0)
            self.sampled.zero_()

        optimizer.register_step_pre_hook(save_unsampled)
        optimizer.register_step_post_hook(restore_unsampled)
