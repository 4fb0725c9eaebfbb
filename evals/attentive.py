"""Attentive probe: a learned query attends over the frozen encoder's tokens, then a linear
classifier (V-JEPA, Bardes et al. 2024, "Revisiting Feature Prediction for Learning Visual
Representations from Video", Sec. 4 and Appendix; ``src/models/attentive_pooler.py`` of
facebookresearch/jepa at 0f772c5; the same probe as AIM's and I-JEPA's frozen evaluations).

- Tokens: the last block's patch tokens of a vision transformer (through its final norm; the
  class token and registers are not among them), or the ``H * W`` positions of a convnet's last
  stage, ``(T, D)`` per image, computed once without augmentation and cached (float32).
- Pooler (V-JEPA's ``AttentivePooler`` with one query, depth 1, ``complete_block=True``): a
  learned query ``q (1, D)``; ``x = LayerNorm(tokens)``; multi-head cross-attention
  ``a = proj(MHA(W_q q, W_k x, W_v x))`` with ``D / heads`` channels per head and scale
  ``(D / heads) ** -0.5``; ``y = q + a``; ``y = y + MLP(LayerNorm(y))`` (GELU, hidden ``4 D``);
  then ``Linear(D, C)``. Init as V-JEPA: truncated normal (std 0.02) for the query and the
  pooler's linear weights, zero biases, the attention output and MLP output weights divided by
  ``sqrt(2)``; the classifier has PyTorch's default init. All from ``seed``.
- Training (V-JEPA's ``configs/evals/vitl16_in1k.yaml`` and its frozen-evaluation ``init_opt``):
  AdamW, betas (0.9, 0.999), lr 1e-3 with a cosine decay to 0 and no warm-up, weight decay 1e-3
  on weights but not on biases and norm parameters, 20 epochs; cross-entropy; the batch order of
  each epoch drawn from (seed, epoch). Nothing is chosen on a validation split: one setting.
- Memory: the cached tokens take ``(N_train + N_test) * T * D * 4`` bytes. Above
  ``max_memory_gb`` (``--max-memory-gb``, else the run's) the protocol stops with one line
  before extracting anything: it does not stream from the encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslbench.api import (
    EvalContext,
    Intermediates,
    LayerTokens,
    Option,
    Score,
    UserError,
    at_least,
    eval_mode,
    intermediate_layers,
    is_vision_transformer,
    positive,
    register_protocol,
    split_features,
)
from sslbench.evals.knn import topk_accuracy
from sslbench.evals.multilayer import _epoch_order

MLP_RATIO = 4.0  # V-JEPA AttentivePooler default
INIT_STD = 0.02  # V-JEPA AttentivePooler default
BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, which V-JEPA's init_opt keeps


class AttentivePooler(nn.Module):
    """One learned query cross-attending over tokens ``(B, T, D)`` -> pooled ``(B, D)`` (see the
    module docstring for the formula)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"attentive: {num_heads} heads do not divide the token width {dim}; pass --attentive-heads H with {dim} % H == 0")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * MLP_RATIO)
        fc2 = nn.Linear(hidden, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), fc2)
        nn.init.trunc_normal_(self.query, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # V-JEPA's _rescale_blocks for layer 1
            self.proj.weight.div_(math.sqrt(2.0))
            fc2.weight.div_(math.sqrt(2.0))

    def forward(self, tokens: Tensor) -> Tensor:
        b, t, d = tokens.shape
        h = self.num_heads
        x = self.norm1(tokens)
        q = self.q(self.query).view(1, h, 1, d // h).expand(b, -1, -1, -1)  # (B, h, 1, d/h)
        k, v = self.kv(x).view(b, t, 2, h, d // h).permute(2, 0, 3, 1, 4)  # each (B, h, T, d/h)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        y = self.query + self.proj(a)
        y = y + self.mlp(self.norm2(y))
        pooled: Tensor = y[:, 0]
        return pooled


class AttentiveClassifier(nn.Module):
    """:class:`AttentivePooler`, then ``Linear(D, C)``: tokens ``(B, T, D)`` -> logits ``(B, C)``."""

    def __init__(self, dim: int, num_heads: int, n_classes: int) -> None:
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads)
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out: Tensor = self.linear(self.pooler(tokens))
        return out


def train_attentive(
    tokens: Tensor,
    labels: Tensor,
    *,
    n_classes: int,
    num_heads: int,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> AttentiveClassifier:
    """Train an :class:`AttentiveClassifier` on cached ``tokens (N, T, D)`` (see the module
    docstring); the same inputs and seed give the same weights."""
    dev = torch.device(device) if device is not None else tokens.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttentiveClassifier(tokens.shape[2], num_heads, n_classes).to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith("bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith("bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=BETAS)
    n = tokens.shape[0]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch_size), eta_min=0.0)
    y = labels.to(torch.long)
    model.train()
    with torch.enable_grad():
        for epoch in range(epochs):
            order = _epoch_order(n, seed, epoch)
            for begin in range(0, n, batch_size):
                idx = order[begin : begin + batch_size]
                loss = F.cross_entropy(model(tokens[idx].to(dev, torch.float32)), y[idx].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def predict(model: nn.Module, tokens: Tensor, *, batch_size: int = 256) -> Tensor:
    """Logits ``(M, C)`` on the CPU of ``tokens (M, T, D)``, batch by batch."""
    dev = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(tokens[i : i + batch_size].to(dev, torch.float32)).float().cpu() for i in range(0, tokens.shape[0], batch_size)])


def attentive_probe(
    train_tokens: Tensor, train_labels: Tensor, test_tokens: Tensor, test_labels: Tensor, *, num_heads: int, **train: object
) -> dict[str, float]:
    """:func:`train_attentive` on train, top-1 (and top-5 with >= 5 classes) on test, in percent."""
    n_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    model = train_attentive(train_tokens, train_labels, n_classes=n_classes, num_heads=num_heads, **train)  # type: ignore[arg-type]
    ks = (1, 5) if n_classes >= 5 else (1,)
    acc = topk_accuracy(predict(model, test_tokens), test_labels, ks)
    return {"attentive_top1": acc[1], **({"attentive_top5": acc[5]} if 5 in acc else {})}


# ---------------------------------------------------------------------------------------------
# The protocol

OPTIONS = (
    Option("--attentive-epochs", 20, "attentive probe: epochs (default 20, V-JEPA)", type=int, check=at_least(1)),
    Option("--attentive-batch-size", 256, "attentive probe: batch size (default 256, as the linear probe)", type=int, check=at_least(1)),
    Option("--attentive-lr", 1e-3, "attentive probe: AdamW lr, cosine to 0 (default 1e-3, V-JEPA)", type=float, check=positive),
    Option("--attentive-wd", 1e-3, "attentive probe: AdamW weight decay (default 1e-3, V-JEPA)", type=float, check=at_least(0)),
    Option(
        "--attentive-heads",
        0,
        "attentive probe: attention heads (default 0: the ViT's own head count, as V-JEPA; a convnet's width / 64)",
        type=int,
        check=at_least(0),
    ),
)


def last_tokens(layers: list[LayerTokens]) -> Tensor:
    """The last layer's tokens ``(B, T, D)`` (patch tokens, or a convnet stage's positions)."""
    return layers[-1][1]


def _heads(ctx: EvalContext, dim: int) -> int:
    """``--attentive-heads``; by default a ViT's own head count (V-JEPA: ``num_heads=encoder.num_heads``)
    and ``dim / 64`` heads of 64 channels for a convnet (one head below 64 channels or when 64 does
    not divide ``dim``)."""
    if ctx.opts.attentive_heads:
        return int(ctx.opts.attentive_heads)
    blocks = getattr(ctx.encoder, "blocks", None)
    own = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks is not None and len(blocks) else None
    if isinstance(own, int):
        return own
    return dim // 64 if dim >= 64 and dim % 64 == 0 else 1


def _check_memory(ctx: EvalContext) -> tuple[int, int, float]:
    """(T, D, GB) of the token cache; a UserError when it exceeds the memory limit."""
    with eval_mode(ctx.encoder), torch.no_grad():
        probe = last_tokens(intermediate_layers(ctx.encoder, torch.zeros(1, 3, ctx.image_size, ctx.image_size, device=ctx.device), 1))
    t, d = int(probe.shape[1]), int(probe.shape[2])
    n = len(ctx.split("train")) + len(ctx.split("test"))
    gb = n * t * d * 4 / 1e9
    limit = ctx.cfg.max_memory_gb if ctx.opts.max_memory_gb is None else ctx.opts.max_memory_gb
    if gb > limit:
        raise UserError(
            f"attentive: caching the tokens of {n} images ({t} x {d} floats each) needs {gb:.1f} GB, over max_memory_gb={limit:g} "
            "(the run's, or --max-memory-gb); raise --max-memory-gb or evaluate fewer images (the probe does not stream from the encoder)"
        )
    return t, d, gb


@register_protocol(
    "attentive",
    options=OPTIONS,
    reuse_key=lambda cfg, opts: {
        "epochs": opts.attentive_epochs,
        "batch_size": opts.attentive_batch_size,
        "lr": opts.attentive_lr,
        "weight_decay": opts.attentive_wd,
        "heads_asked": opts.attentive_heads,
        "seed": opts.seed,
    },
    description="V-JEPA attentive probe: one learned query cross-attends over the frozen patch tokens, then a linear classifier",
)
def attentive(ctx: EvalContext, fraction: float | None) -> Score:
    opts = ctx.opts
    t, d, gb = _check_memory(ctx)
    heads = _heads(ctx, d)
    model = Intermediates(ctx.encoder, 1, last_tokens)
    tokens = {
        s: split_features(
            model, ctx.split(s), image_size=ctx.image_size, device=ctx.device, precision=ctx.precision, num_workers=ctx.cfg.num_workers, flatten=False
        )
        for s in ("train", "test")
    }
    metrics = attentive_probe(
        tokens["train"],
        ctx.split("train").labels,
        tokens["test"],
        ctx.split("test").labels,
        num_heads=heads,
        epochs=opts.attentive_epochs,
        batch_size=opts.attentive_batch_size,
        lr=opts.attentive_lr,
        weight_decay=opts.attentive_wd,
        seed=opts.seed,
        device=ctx.device,
    )
    where = "last block's patch tokens (final norm)" if is_vision_transformer(ctx.encoder) else "last stage's spatial positions"
    record = {
        "tokens": f"{where}: {t} x {d}",
        "cache_gb": round(gb, 4),
        "pooler": f"1 query, cross-attention ({heads} heads) + MLP block (ratio {MLP_RATIO:g}), then linear",
        "heads": heads,
        "heads_asked": opts.attentive_heads,
        "optimizer": "adamw",
        "betas": list(BETAS),
        "lr": opts.attentive_lr,
        "schedule": "cosine to 0, no warm-up",
        "weight_decay": opts.attentive_wd,
        "epochs": opts.attentive_epochs,
        "batch_size": opts.attentive_batch_size,
        "seed": opts.seed,
        "reference": "Bardes et al. 2024 (V-JEPA), src/models/attentive_pooler.py",
    }
    return Score(metrics, record)
