"""Data-parallel HREM on plain ``torch.distributed``: the loss sees the global batch.

HREM's relation graph, its top-k thresholds and the negatives of the matching loss are all
defined over the whole batch (docs/method.md §5). Each worker therefore

1. encodes its local rows (the towers, wrapped in DDP by :func:`wrap_ddp`),
2. all-gathers the encodings with :func:`gather_encoded` (``train_step``'s ``gather``), and
3. computes the *same* global loss as every other worker.

The towers' BatchNorm must also normalise over the global batch: :func:`sync_batchnorm`
(CPU and GPU; torch's ``SyncBatchNorm`` refuses CPU tensors).

Exact equality with single-device training on the global batch needs the same padding as
that single device would see: the BatchNorm statistics (docs/method.md §2) and the
fragment scores (§4, every region slot of an image counts) include padded region rows, so every
rank must pad its images to the same N (no region dropout, or a fixed N such as 36); and a
caption shorter than ``frag_min_words`` reads the [PAD]-position features up to that many
positions, so every rank must pad its tokens to at least ``min(frag_min_words, global
longest)``. With unequal padding the result is still a valid HREM loss over the global
batch, only not bit-for-bit the single-device one.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hrem_ray.model.hrem import HREM, Encoded
from hrem_ray.model.relation import FragmentScores, fragment_scores

# torch >= 2.10 marks the autograd collectives deprecated in favour of private
# ``_functional_collectives``; they still work and have the backward we rely on.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"hrem_ray\.train\.distributed")


def world_size() -> int:
    """Workers in the default process group; 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _pad_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Zero-pad every dimension of ``x`` at its end up to ``shape`` (differentiable)."""
    pad: list[int] = []
    for have, want in zip(reversed(x.shape), reversed(shape), strict=True):
        pad += [0, want - have]
    return F.pad(x, pad)


def _gather_rows(x: Tensor, counts: list[int], shape: tuple[int, ...], grad: bool) -> Tensor:
    """Pad to the common ``shape``, all-gather in rank order, keep each rank's real rows."""
    if grad:
        parts = dist_fn.all_gather(_pad_to(x, shape))
    else:
        x = _pad_to(x.detach(), shape).contiguous()
        parts = [torch.empty_like(x) for _ in counts]
        dist.all_gather(parts, x)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def gather_encoded(enc: Encoded, image_ids: Tensor) -> tuple[Encoded, Tensor]:
    """All-gather local encodings and image ids into the global batch, in rank order.

    v and t keep their gradients (``torch.distributed.nn.functional.all_gather``); the
    pre-pool features, lengths and ids are gathered without (the relation module detaches
    ``regions``/``words`` anyway). Ranks may differ in batch size, N and L: the sizes are
    gathered first, everything is zero-padded to the largest, and each rank's padded *rows*
    are dropped again; N and L stay at the global maximum (lengths mark the real part).

    Why this gives exactly the single-device gradient: every rank computes the same global
    loss L. The backward of all_gather sums, into each rank's own slice, the gradients that
    all W ranks computed for it, so rank r's tower receives W * dL/d(its rows); DDP then
    averages over the W ranks, giving sum_r dL/d(rows of r) = dL/dtheta. The relation-module
    parameters get dL/dphi on every rank directly (their inputs are the gathered, identical
    tensors); averaging W copies of it leaves it unchanged (see :func:`wrap_ddp`).

    Without a process group, or with a single worker, the inputs come back unchanged.
    """
    if world_size() == 1:
        return enc, image_ids
    b, n, d = enc.regions.shape
    sizes = torch.tensor([b, n, enc.words.shape[1]], device=enc.v.device)
    gathered = [torch.empty_like(sizes) for _ in range(world_size())]
    dist.all_gather(gathered, sizes)
    every = torch.stack(gathered).tolist()  # one host read, not one per number
    counts = [s[0] for s in every]
    bmax, nmax, lmax = (max(col) for col in zip(*every, strict=True))

    dims = [enc.v.shape[1], enc.t.shape[1]]
    vt = _gather_rows(torch.cat([enc.v, enc.t], dim=1), counts, (bmax, sum(dims)), True)
    ints = torch.stack([enc.image_lengths, enc.token_lengths, image_ids], dim=1)
    ints = _gather_rows(ints, counts, (bmax, 3), False)
    v, t = vt.split(dims, dim=1)
    out = Encoded(
        v=v,
        t=t,
        regions=_gather_rows(enc.regions, counts, (bmax, nmax, d), False),
        words=_gather_rows(enc.words, counts, (bmax, lmax, enc.words.shape[2]), False),
        image_lengths=ints[:, 0].to(enc.image_lengths.dtype),
        token_lengths=ints[:, 1].to(enc.token_lengths.dtype),
    )
    return out, ints[:, 2].to(image_ids.dtype)


def shard_sizes(n: int, workers: int) -> list[int]:
    """Near-equal split of n rows over the workers, in rank order (the first get one more)."""
    return [n // workers + (r < n % workers) for r in range(workers)]


def sharded_fragment_scores(
    regions: Tensor, words: Tensor, word_lengths: Tensor, **kwargs
) -> FragmentScores:
    """:func:`fragment_scores` of the global batch, each worker scoring a share of it.

    Every worker holds the gathered regions and words. Rank r scores the r-th near-equal
    share of the captions against every image (in chunks, ``kwargs["chunk"]``); a pair's
    scores serve both directions, so each (caption, image) pair is scored once over all
    workers and per-worker work and memory fall by W (docs/global-batch.md). The small
    caption-major results ([B_r, B, 2 + 2 topk]) are then all-gathered into the global ones.
    They carry no gradient (the features are detached, docs/method.md §4), so a plain
    all-gather keeps the autograd graph of the single-worker computation.
    """
    workers = world_size()
    if workers == 1:
        return fragment_scores(regions, words, word_lengths, **kwargs)
    counts = shard_sizes(words.shape[0], workers)
    start = sum(counts[: dist.get_rank()])
    mine = slice(start, start + counts[dist.get_rank()])
    part = fragment_scores(regions, words[mine], word_lengths[mine], **kwargs)
    packed = torch.cat(
        [part.m_t2i[..., None], part.m_i2t.t()[..., None], part.k_t2i, part.k_i2t.transpose(0, 1)],
        dim=2,
    )  # [B_r, B_images, 2 + 2 topk]
    full = _gather_rows(packed, counts, (max(counts), *packed.shape[1:]), False)
    topk = part.k_t2i.shape[2]
    m_t2i, m_i2t, k_t2i, k_i2t = full.split([1, 1, topk, topk], dim=2)
    return FragmentScores(m_t2i[..., 0], k_t2i, m_i2t[..., 0].t(), k_i2t.transpose(0, 1))


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose batch statistics span every worker's rows (CPU and GPU).

    Same parameters, buffers and state_dict keys as ``nn.BatchNorm1d``. With a single
    worker, or when running statistics are used (eval mode), it *is* BatchNorm1d. Otherwise
    the mean and the biased variance come from differentiable all-reduces of per-channel
    sums (two passes, like BatchNorm, rather than sum of squares, for accuracy), and the
    running statistics are updated as BatchNorm does (unbiased variance, ``momentum``).
    A training-mode forward is then a collective: every worker must call it.

    Statistics are computed in float32 (float64 input stays float64) and the output is cast
    back to the input's dtype, as BatchNorm does under autocast: a bf16 row count would round
    3,500 rows to 3,504, and bf16 sums lose the mean's digits.
    """

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        if not batch_stats or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xs = x if x.dtype == torch.float64 else x.float()
        rows = torch.full((1,), x.numel() // x.shape[1], dtype=xs.dtype, device=x.device)
        total = dist_fn.all_reduce(torch.cat([xs.sum(dims), rows]))
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = xs - mean.view(shape)
        var = dist_fn.all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1.0 - f).add_(mean, alpha=f)
        self.running_var.mul_(1.0 - f).add_(unbiased_var, alpha=f)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d) -> GlobalBatchNorm1d:
        """A GlobalBatchNorm1d sharing ``bn``'s parameter and buffer objects."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        for name, param in bn.named_parameters(recurse=False):
            new.register_parameter(name, param)  # the same objects: optimisers stay valid
        for name, buffer in bn.named_buffers(recurse=False):
            new.register_buffer(name, buffer)
        new.train(bn.training)
        return new


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``model`` (in place) by a GlobalBatchNorm1d.

    Parameters and buffers are the same objects, so state_dict keys (``fc.mlp.bns.0.weight``,
    ``running_mean``, ...) and any optimiser built before stay valid. Returns ``model``.
    """
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm1d:
            setattr(model, name, GlobalBatchNorm1d.from_batchnorm(child))
        else:
            sync_batchnorm(child)
    return model


class _GradAverager:
    """Averages the gradients of parameters DDP ignores (the relation module's) across ranks
    in one flattened all-reduce at the end of each backward pass, rather than one blocking
    all-reduce per parameter (about 20). The first gradient of a backward queues the flush,
    as DDP's own reducer does; every rank computes the same graph, so every rank flushes the
    same parameters, in their registration order."""

    def __init__(self, params: list[nn.Parameter]):
        self.order = {id(p): i for i, p in enumerate(params)}
        self.pending: list[nn.Parameter] = []
        for param in params:
            param.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, param: nn.Parameter) -> None:
        if not self.pending:
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        self.pending.append(param)

    def _flush(self) -> None:
        params = sorted(self.pending, key=lambda p: self.order[id(p)])
        self.pending = []
        if world_size() == 1:
            return
        grads = [p.grad for p in params]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world_size())
        for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads),
                                  strict=True):  # fmt: skip
            grad.copy_(averaged)


def wrap_ddp(model: HREM, **ddp_kwargs) -> DistributedDataParallel:
    """Wrap HREM for data-parallel training with :func:`gather_encoded` as the gather.

    The default process group must be initialised and ``model`` already on its device.

    - BatchNorm layers become :class:`GlobalBatchNorm1d`.
    - The relation module runs *outside* DDP's forward (on gathered encodings), and only
      after warmup. Inside DDP it breaks either way: with ``find_unused_parameters=True``
      DDP marks it unused at the end of forward and then fails when its gradients arrive
      ("marked ready twice"); without, its unused warm-up iterations (and the unused
      ``bns.1``) leave DDP's reduction unfinished. So DDP ignores its parameters; they are
      broadcast from rank 0 here, and their gradients are averaged across ranks in one
      all-reduce per backward (:class:`_GradAverager`; identical already when every rank
      draws the same dropout masks, the average keeps the replicas in sync when they do not).
    - DDP ignores the one unused tower module, ``bns.1`` (docs/method.md §3: the reference
      creates it and never calls it), so ``find_unused_parameters`` can stay off: no graph
      walk after every forward.
    - ``broadcast_buffers`` is off: the BatchNorm statistics are global already (every rank
      gets the same all-reduced numbers) and BERT's buffers are constants.
    - The fragment scores of the relation module are sharded across the workers
      (:func:`sharded_fragment_scores`).
    """
    sync_batchnorm(model)
    model.relation.score_fragments = sharded_fragment_scores
    relation = [f"relation.{name}" for name, _ in model.relation.named_parameters()]
    relation += [f"relation.{name}" for name, _ in model.relation.named_buffers()]
    unused = [
        f"img_enc.fc.mlp.bns.1.{name}" for name, _ in model.img_enc.fc.mlp.bns[1].named_parameters()
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, relation + unused)
    with torch.no_grad():
        for tensor in [*model.relation.parameters(), *model.relation.buffers()]:
            dist.broadcast(tensor, src=0)
    _GradAverager([p for p in model.relation.parameters() if p.requires_grad])
    ddp_kwargs.setdefault("find_unused_parameters", False)
    ddp_kwargs.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(model, **ddp_kwargs)
