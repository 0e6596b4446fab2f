"""Planted structure for the L0 masks to find: a small trained Llama embedded in a larger one.

The small model is trained for a short while on the CPU on text every Python install ships (the
standard library's own ``.py`` files, read as bytes: vocabulary 256). :func:`embed` builds a larger
decoder that holds the small one plus planted units in every mask family:

* ``dead``: units whose output is exactly zero (identity layers, KV groups and query heads whose ``wo``
  columns are zero, MLP neurons whose ``w2`` columns are zero, hidden dimensions nothing writes). The
  large model computes exactly the small one (RMSNorm weights and epsilon are rescaled for the extra
  hidden dimensions).
* ``cancel``: pairs of loud units whose outputs cancel exactly (the same inputs, opposite output
  columns): worth nothing together, ranked high by any activation-times-output score, and harmful when
  only one of a pair is dropped. A pair of neurons reads the input rows of live neurons (``pair_inputs``:
  one neuron's, or two neurons' mixed), so each half fires like one and writes ``LOUD`` times a typical
  output column. Planted for ``kv_head`` (pairs of groups), ``head`` and
  ``intermediate``; a layer's and a hidden dimension's importance already measure their output, so
  ``layer`` and ``hidden`` carry dead units in this kind.
* ``duplicate``: copies of the small model's own query heads and neurons, the original's output
  column split in half between the two copies (the function is unchanged). One copy suffices when
  the weights train (the kept copy doubles its output column); dropping both loses the unit. Each half
  scores half the original, so a ranking drops both copies of weak units and keeps a loud useless one.

Every planted unit sits at a random position among the small model's units, so no index order or
tie-break finds it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder

KINDS = ("dead", "cancel", "duplicate")
PLANT_FAMILIES = ("layer", "kv_head", "head", "intermediate", "hidden")
PAIR_INPUTS = ("copy", "mix")
LOUD = 3.0  # output columns of cancelling units are this many times the model's typical column norm


# ------------------------------------------------------------------------------------------ text
def stdlib_corpus(max_bytes: int = 4_000_000) -> tuple[Tensor, Tensor]:
    """Train and held-out byte streams from the standard library's top-level ``.py`` files.

    Files are taken in name order; every 8th file is held out, so the two streams share no file.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        data = path.read_bytes()
        (held if i % 8 == 7 else train).extend(data)
        if len(train) + len(held) >= max_bytes:
            break
    if len(train) < 100_000 or len(held) < 10_000:
        raise RuntimeError(f"the standard library at {root} holds too little Python source for the corpus")
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held)


def batch_at(stream: Tensor, step: int, batch: int, seq_len: int, seed: int) -> Tensor:
    """``batch`` windows of ``seq_len`` tokens at positions drawn from ``(seed, step)``."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def held_out_batches(stream: Tensor, n: int = 8, batch: int = 16, seq_len: int = 64) -> list[Tensor]:
    """A fixed evaluation set: ``n`` batches of evenly spaced windows of the held-out stream."""
    total = n * batch
    stride = (stream.numel() - seq_len - 1) // total
    rows = [stream[i * stride : i * stride + seq_len] for i in range(total)]
    return [torch.stack(rows[i * batch : (i + 1) * batch]) for i in range(n)]


@torch.no_grad()
def mean_loss(decoder: Decoder, batches: list[Tensor], masks: Mapping[str, Tensor] | None = None) -> float:
    """Mean next-token cross-entropy of ``decoder`` (optionally masked) over ``batches``."""
    was = decoder.training
    decoder.eval()
    total = 0.0
    for ids in batches:
        logits = decoder(ids, masks=masks)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    decoder.train(was)
    return total / len(batches)


# ------------------------------------------------------------------------------------ small model
@dataclass(frozen=True)
class SmallSpec:
    """Shape and training of the small model."""

    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 8
    intermediate_size: int = 32
    steps: int = 800
    batch: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0

    def config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=256,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            max_seq_len=self.seq_len,
            attn_impl="sdpa",
        )

    def key(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:16]


def train_small(spec: SmallSpec, train: Tensor, cache_dir: str | os.PathLike[str] | None = None) -> Decoder:
    """The small model trained for ``spec.steps`` AdamW steps (cached by spec under ``cache_dir``)."""
    path = Path(cache_dir) / f"small-{spec.key()}.pt" if cache_dir is not None else None
    torch.manual_seed(spec.seed)
    decoder = Decoder(spec.config())
    decoder.init_weights()
    if path is not None and path.is_file():
        decoder.load_state_dict(torch.load(path, weights_only=True))
        return decoder
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0)
    decoder.train()
    for step in range(spec.steps):
        ids = batch_at(train, step, spec.batch, spec.seq_len, spec.seed)
        logits = decoder(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        torch.save(decoder.state_dict(), staging)
        staging.replace(path)
    return decoder


# --------------------------------------------------------------------------------------- planting
@dataclass(frozen=True)
class PlantSpec:
    """How many units to plant per family (per layer for heads, groups and neurons) and of which kind.

    ``heads`` are planted in every KV group (the small model's groups and planted ones alike). ``pair_inputs``
    says what a cancelling pair of neurons reads: ``copy``, a live neuron's ``w1`` and ``w3`` rows (the pair's
    activation is that neuron's, so the three are interchangeable to a re-fit of ``w2``), or ``mix``, the ``w1``
    row of one live neuron and the ``w3`` row of another (it fires like a live neuron, and no live neuron's
    activation is proportional to it).
    """

    kind: str = "dead"
    layers: int = 1
    kv_heads: int = 2
    heads: int = 2
    intermediate: int = 8
    hidden: int = 8
    seed: int = 0
    pair_inputs: str = "copy"

    def check(self, small: ModelConfig) -> None:
        """Refuse a plan that cannot be planted or whose target cannot be reached, naming the family."""
        if self.kind not in KINDS:
            raise ValueError(f"plant kind must be one of {KINDS}, got {self.kind!r}")
        if self.pair_inputs not in PAIR_INPUTS:
            raise ValueError(f"pair_inputs must be one of {PAIR_INPUTS}, got {self.pair_inputs!r}")
        counts = {"layer": self.layers, "kv_head": self.kv_heads, "head": self.heads}
        counts.update(intermediate=self.intermediate, hidden=self.hidden)
        for family, n in counts.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"planted {family}: the count must be a non-negative integer, got {n!r}")
        if not any(counts.values()):
            raise ValueError("the plan plants no unit in any family; plant at least one")
        if self.kind == "cancel":
            for family in ("kv_head", "head", "intermediate"):
                if counts[family] % 2:
                    raise ValueError(
                        f"planted {family}: cancelling units come in pairs, so the count must be even, "
                        f"got {counts[family]}"
                    )
        if self.kind == "duplicate":
            if self.kv_heads:
                raise ValueError(
                    f"planted kv_head: duplicated KV groups are not planted (got {self.kv_heads}); "
                    "set kv_heads=0 with kind 'duplicate'"
                )
            for family, have in (("head", small.heads_per_group), ("intermediate", small.intermediate_size)):
                if counts[family] > have:
                    raise ValueError(
                        f"planted {family}: {counts[family]} duplicates asked for but the small model has only "
                        f"{have} units to copy per {'KV group' if family == 'head' else 'layer'}"
                    )


@dataclass
class Planted:
    """The large model, the shape the pruning should reach, and where the planted units are."""

    decoder: Decoder
    small_config: ModelConfig
    plan: PlantSpec
    target: dict[str, int]
    # family -> boolean tensor shaped like the family's mask: True at planted units
    planted: dict[str, Tensor] = field(default_factory=dict)
    # family -> long tensor shaped like the mask: pair id of cancelling/duplicate units, -1 elsewhere
    pairs: dict[str, Tensor] = field(default_factory=dict)
    # family -> boolean mask of the rows (layers / groups) that belong to the small model
    real_rows: dict[str, Tensor] = field(default_factory=dict)
    # family -> long tensor shaped like the mask: units with one activation (a live neuron and the cancelling
    # halves that read its rows, ``pair_inputs: copy``) share a group id, -1 elsewhere. A re-fit of the output
    # columns can keep any one unit of a group, so which of them are "the planted ones" is a label, not a fact.
    collinear: dict[str, Tensor] = field(default_factory=dict)


def _positions(n_real: int, n_planted: int, g: torch.Generator) -> Tensor:
    """Source index per large slot: 0..n_real-1 in order for real units, -1 for planted ones."""
    total = n_real + n_planted
    planted_slots = torch.randperm(total, generator=g)[:n_planted]
    source = torch.full((total,), -1, dtype=torch.long)
    real = torch.ones(total, dtype=torch.bool)
    real[planted_slots] = False
    source[real] = torch.arange(n_real)
    return source


def _pair_up(slots: Tensor, g: torch.Generator) -> list[tuple[int, int]]:
    """Random disjoint pairs of the given slot indices."""
    order = slots[torch.randperm(slots.numel(), generator=g)].tolist()
    return [(order[i], order[i + 1]) for i in range(0, len(order) - 1, 2)]


@torch.no_grad()
def embed(small: Decoder, plan: PlantSpec) -> Planted:
    """A larger decoder computing exactly what ``small`` computes, plus the planted units of ``plan``.

    ``dead`` and ``cancel`` plans compute exactly the small model; ``duplicate`` plans too, up to the
    rounding of the split output columns.
    """
    sc = small.config
    plan.check(sc)
    g = torch.Generator().manual_seed(plan.seed)
    kind = plan.kind
    hpg_s = sc.heads_per_group
    d_l = sc.d_model + plan.hidden
    L_l = sc.n_layers + plan.layers
    kv_l = sc.n_kv_heads + plan.kv_heads
    hpg_l = hpg_s + plan.heads
    I_l = sc.intermediate_size + plan.intermediate
    ratio = sc.d_model / d_l
    lc = sc.replace(
        d_model=d_l,
        n_layers=L_l,
        n_kv_heads=kv_l,
        n_heads=kv_l * hpg_l,
        intermediate_size=I_l,
        rms_norm_eps=sc.rms_norm_eps * ratio,
    )
    large = Decoder(lc)
    large.init_weights()
    hd = sc.head_dim
    dim_src = _positions(sc.d_model, plan.hidden, g)
    layer_src = _positions(sc.n_layers, plan.layers, g)
    kv_src = _positions(sc.n_kv_heads, plan.kv_heads, g)
    live_dims = dim_src >= 0
    norm_scale = math.sqrt(ratio)

    def spread_cols(w: Tensor, out: Tensor) -> None:
        """Copy ``w`` [..., d_s] into the live hidden columns of ``out`` [..., d_l]; planted columns 0."""
        out.zero_()
        out[..., live_dims] = w

    def spread_rows(w: Tensor, out: Tensor) -> None:
        out.zero_()
        out[live_dims] = w

    spread_cols(small.tok_embeddings.weight, large.tok_embeddings.weight)
    spread_rows(small.norm.weight * norm_scale, large.norm.weight)
    if small.output is not None:
        spread_cols(small.output.weight, large.output.weight)

    planted = {
        "hidden": ~live_dims,
        "layer": layer_src < 0,
        "kv_head": torch.zeros(L_l, kv_l, dtype=torch.bool),
        "head": torch.zeros(L_l, kv_l * hpg_l, dtype=torch.bool),
        "intermediate": torch.zeros(L_l, I_l, dtype=torch.bool),
    }
    pairs = {f: torch.full(t.shape, -1, dtype=torch.long) for f, t in planted.items()}
    collinear = {"intermediate": torch.full(planted["intermediate"].shape, -1, dtype=torch.long)}
    typical_wo = small.layers[0].attention.wo.weight.norm(dim=0).mean().item()
    typical_w2 = small.layers[0].feed_forward.w2.weight.norm(dim=0).mean().item()
    pair_id = 0

    for li in range(L_l):
        blk, src_i = large.layers[li], int(layer_src[li])
        real_layer = src_i >= 0
        sblk = small.layers[src_i if real_layer else 0]
        for norm in ("attention_norm", "ffn_norm"):
            spread_rows(getattr(sblk, norm).weight * norm_scale, getattr(blk, norm).weight)
        att, satt = blk.attention, sblk.attention
        wq = att.wq.weight.view(kv_l, hpg_l, hd, d_l)
        wk = att.wk.weight.view(kv_l, hd, d_l)
        wv = att.wv.weight.view(kv_l, hd, d_l)
        wo = att.wo.weight.view(d_l, kv_l, hpg_l, hd)
        swq = satt.wq.weight.view(sc.n_kv_heads, hpg_s, hd, sc.d_model)
        swk = satt.wk.weight.view(sc.n_kv_heads, hd, sc.d_model)
        swv = satt.wv.weight.view(sc.n_kv_heads, hd, sc.d_model)
        swo = satt.wo.weight.view(sc.d_model, sc.n_kv_heads, hpg_s, hd)
        wo.zero_()
        for gl in range(kv_l):
            gs = int(kv_src[gl])
            if gs >= 0:
                spread_cols(swk[gs], wk[gl])
                spread_cols(swv[gs], wv[gl])
            head_src = _positions(hpg_s, plan.heads, g)
            for hl in range(hpg_l):
                hs = int(head_src[hl])
                if gs >= 0 and hs >= 0:
                    spread_cols(swq[gs, hs], wq[gl, hl])
                    if real_layer:
                        wo[live_dims, gl, hl] = swo[:, gs, hs]
            if real_layer and gs < 0:
                planted["kv_head"][li, gl] = True
            if not (real_layer and gs >= 0):
                continue
            slots = torch.nonzero(head_src < 0).flatten()
            planted["head"][li, gl * hpg_l + slots] = True
            if kind == "cancel":
                for a, b in _pair_up(slots, g):
                    wq[gl, b] = wq[gl, a]
                    column = torch.randn(d_l, hd, generator=g) * live_dims[:, None]
                    column *= LOUD * typical_wo / column.norm(dim=0).mean()
                    wo[:, gl, a], wo[:, gl, b] = column, -column
                    pairs["head"][li, [gl * hpg_l + a, gl * hpg_l + b]] = pair_id
                    pair_id += 1
            elif kind == "duplicate":
                real_slots = torch.nonzero(head_src >= 0).flatten()
                originals = real_slots[torch.randperm(real_slots.numel(), generator=g)[: slots.numel()]]
                for copy, orig in zip(slots.tolist(), originals.tolist(), strict=True):
                    wq[gl, copy] = wq[gl, orig]
                    wo[:, gl, orig] *= 0.5
                    wo[:, gl, copy] = wo[:, gl, orig]
                    pairs["head"][li, [gl * hpg_l + orig, gl * hpg_l + copy]] = pair_id
                    pair_id += 1
        if real_layer and kind == "cancel":  # pairs of planted KV groups with equal keys, values, queries
            for a, b in _pair_up(torch.nonzero(kv_src < 0).flatten(), g):
                wk[b], wv[b], wq[b] = wk[a], wv[a], wq[a]
                column = torch.randn(d_l, hpg_l, hd, generator=g) * live_dims[:, None, None]
                column *= LOUD * typical_wo / column.norm(dim=0).mean()
                wo[:, a], wo[:, b] = column, -column
                pairs["kv_head"][li, [a, b]] = pair_id
                pair_id += 1

        ffn, sffn = blk.feed_forward, sblk.feed_forward
        inter_src = _positions(sc.intermediate_size, plan.intermediate, g)
        live_inter = inter_src >= 0
        ffn.w1.weight[live_inter] = _spread(sffn.w1.weight, live_dims)
        ffn.w3.weight[live_inter] = _spread(sffn.w3.weight, live_dims)
        ffn.w2.weight.zero_()
        if real_layer:
            ffn.w2.weight[:, live_inter] = _spread(sffn.w2.weight.T, live_dims).T
            slots = torch.nonzero(~live_inter).flatten()
            planted["intermediate"][li, slots] = True
            if kind == "cancel":
                real_slots = torch.nonzero(live_inter).flatten()
                for a, b in _pair_up(slots, g):
                    # both read live neurons' input rows, so each fires like one (a random row fires a
                    # hundredth as much, which would leave half a pair nearly harmless)
                    gate = int(real_slots[torch.randint(real_slots.numel(), (1,), generator=g)])
                    up = gate
                    if plan.pair_inputs == "mix":  # another live neuron's w3 row
                        others = real_slots[real_slots != gate]
                        up = int(others[torch.randint(others.numel(), (1,), generator=g)])
                    for unit in (a, b):
                        ffn.w1.weight[unit], ffn.w3.weight[unit] = ffn.w1.weight[gate], ffn.w3.weight[up]
                    column = torch.randn(d_l, generator=g) * live_dims
                    column *= LOUD * typical_w2 / column.norm()
                    ffn.w2.weight[:, a], ffn.w2.weight[:, b] = column, -column
                    pairs["intermediate"][li, [a, b]] = pair_id
                    pair_id += 1
                    if plan.pair_inputs == "copy":  # one group per live neuron read: id li * I_l + gate
                        collinear["intermediate"][li, [gate, a, b]] = li * I_l + gate
            elif kind == "duplicate":
                real_slots = torch.nonzero(live_inter).flatten()
                originals = real_slots[torch.randperm(real_slots.numel(), generator=g)[: slots.numel()]]
                for copy, orig in zip(slots.tolist(), originals.tolist(), strict=True):
                    ffn.w1.weight[copy], ffn.w3.weight[copy] = ffn.w1.weight[orig], ffn.w3.weight[orig]
                    ffn.w2.weight[:, orig] *= 0.5
                    ffn.w2.weight[:, copy] = ffn.w2.weight[:, orig]
                    pairs["intermediate"][li, [orig, copy]] = pair_id
                    pair_id += 1

    real_layers = layer_src >= 0
    real_rows = {
        "layer": torch.ones(L_l, dtype=torch.bool),
        "hidden": torch.ones(d_l, dtype=torch.bool),
        "kv_head": real_layers[:, None].expand(L_l, kv_l).clone(),
        "head": (real_layers[:, None] & (kv_src >= 0)[None, :]).repeat_interleave(hpg_l, dim=1),
        "intermediate": real_layers[:, None].expand(L_l, I_l).clone(),
    }
    target = {
        "n_layers": sc.n_layers,
        "n_heads": sc.n_heads,
        "n_kv_heads": sc.n_kv_heads,
        "d_model": sc.d_model,
        "intermediate_size": sc.intermediate_size,
    }
    return Planted(large, sc, plan, target, planted, pairs, real_rows, collinear)


def _spread(w: Tensor, live: Tensor) -> Tensor:
    """``w`` [n, d_s] widened to [n, d_l] with zeros in the planted hidden columns."""
    out = w.new_zeros(w.shape[0], live.numel())
    out[:, live] = w
    return out


def ideal_masks(planted: Planted, families: tuple[str, ...]) -> dict[str, Tensor]:
    """0/1 masks that drop exactly the planted units of ``families`` (one copy of each duplicate pair)."""
    masks = {}
    for family in families:
        source = "layer" if family in ("head_layer", "mlp") else family
        drop = planted.planted[source].clone()
        if planted.plan.kind == "duplicate" and source in ("head", "intermediate"):
            drop = planted.pairs[source] >= 0
            drop &= planted.planted[source]  # the copies; the originals stay
        masks[family] = (~drop).float()
    if "head" in masks and "kv_head" in masks:
        hpg = planted.decoder.config.heads_per_group
        masks["head"] = masks["head"] * masks["kv_head"].repeat_interleave(hpg, dim=1)
    return masks
