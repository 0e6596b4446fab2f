"""ComposerLlama: loss, metrics (per domain, never NaN), FLOPs, meta-device init and a Composer fit on CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmshearing.models.composer_model import ComposerLlama, LMOutput
from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Block, Decoder, init_module, is_block
from llmshearing.models.metrics import DomainLanguageCrossEntropy

DOMAINS = ("web", "code", "absent")


def _config(**changes) -> ModelConfig:
    base = ModelConfig(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=40,
        max_seq_len=32,
        init_std=0.1,
    )
    return base.replace(**changes)


def _batch(seed: int = 0, batch_size: int = 4, seq_len: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 50, (batch_size, seq_len), generator=g),
        "domain": torch.tensor([0, 1, 0, 1][:batch_size]),
        "idx": torch.arange(batch_size),
    }


def _manual_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_loss_is_shifted_next_token_cross_entropy():
    torch.manual_seed(0)
    model = ComposerLlama(_config(), DOMAINS).eval()
    batch = _batch()
    out = model(batch)
    assert isinstance(out, LMOutput) and out.l0 is None and out.logits.shape == (4, 12, 50)
    loss = model.loss(out, batch)
    assert set(loss) == {"total", "ce"}
    torch.testing.assert_close(loss["ce"], _manual_ce(out.logits, batch["input_ids"]), atol=1e-6, rtol=0)
    assert loss["total"] is loss["ce"]

    labels = batch["input_ids"].clone()
    labels[:, 6:] = -100  # padding: ignored targets
    loss = model.loss(out, {**batch, "labels": labels})["ce"]
    expected = F.cross_entropy(out.logits[:, :5].reshape(-1, 50), labels[:, 1:6].reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


@dataclass
class _L0Output:
    masks: dict[str, torch.Tensor]
    penalty: torch.Tensor | None


class _FixedL0(nn.Module):
    """An L0 module with fixed masks and a learnable penalty (the interface the pruning Algorithm fills)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head = torch.ones(config.n_layers, config.n_heads)
        self.head[:, 0] = 0
        self.lam = nn.Parameter(torch.tensor(0.25))

    def forward(self) -> _L0Output:
        return _L0Output({"head": self.head}, self.lam * 2 if self.training else None)


def test_l0_module_masks_and_penalty_enter_forward_and_loss():
    torch.manual_seed(0)
    model = ComposerLlama(_config(), DOMAINS)
    batch = _batch()
    model.l0_module = _FixedL0(model.config)
    out = model(batch)
    with torch.no_grad():
        assert torch.equal(out.logits, model.model(batch["input_ids"], masks={"head": model.l0_module.head}))
    loss = model.loss(out, batch)
    assert set(loss) == {"total", "ce", "lagrangian"}
    torch.testing.assert_close(loss["total"], loss["ce"] + 0.5)
    loss["total"].backward()
    assert model.l0_module.lam.grad == pytest.approx(2.0)
    model.eval()
    assert set(model.loss(model(batch), batch)) == {"total", "ce"}  # eval: deterministic masks, no penalty

    model.l0_module = None  # without an L0 module, masks may come with the batch
    masks = {"layer": torch.tensor([1.0, 0.0])}
    with torch.no_grad():
        assert torch.equal(
            model({**batch, "masks": masks}).logits, model.model(batch["input_ids"], masks=masks)
        )


def test_metrics_per_domain_and_absent_domain_is_not_nan():
    torch.manual_seed(0)
    model = ComposerLlama(_config(), DOMAINS).eval()
    metrics = model.get_metrics(is_train=False)
    assert set(metrics) == {
        "LanguageCrossEntropy",
        "Perplexity",
        *(f"{d}_LanguageCrossEntropy" for d in DOMAINS),
    }
    batches = [_batch(0), _batch(1)]
    logits = []
    with torch.no_grad():
        for batch in batches:
            out = model(batch)
            logits.append(out.logits)
            for metric in metrics.values():
                model.update_metric(batch, out, metric)
    all_logits, all_ids = torch.cat(logits), torch.cat([b["input_ids"] for b in batches])
    all_domains = torch.cat([b["domain"] for b in batches])
    overall = _manual_ce(all_logits, all_ids)
    torch.testing.assert_close(metrics["LanguageCrossEntropy"].compute(), overall, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["Perplexity"].compute(), overall.exp(), atol=1e-4, rtol=0)
    for index, domain in enumerate(DOMAINS[:2]):
        rows = all_domains == index
        value = metrics[f"{domain}_LanguageCrossEntropy"].compute()
        torch.testing.assert_close(value, _manual_ce(all_logits[rows], all_ids[rows]), atol=1e-5, rtol=0)
        assert metrics[f"{domain}_LanguageCrossEntropy"].tokens == int(rows.sum()) * 11
    absent = metrics["absent_LanguageCrossEntropy"]
    value = absent.compute()
    assert not torch.isnan(value) and value.item() == 0.0 and absent.tokens == 0
    # a batch without domain ids contributes to no domain
    absent.update(all_logits, all_ids, None)
    assert absent.compute().item() == 0.0


def test_domain_metric_sums_across_ranks():
    """Per-rank states merge by summation (what torchmetrics' sync does across ranks)."""
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(6, 5, 7, generator=g), torch.randint(0, 7, (6, 5), generator=g)
    domain = torch.tensor([0, 1, 0, 0, 1, 1])
    rank0, rank1, whole = (DomainLanguageCrossEntropy(0) for _ in range(3))
    rank0.update(logits[:3], targets[:3], domain[:3])  # 2 rows of domain 0
    rank1.update(logits[3:], targets[3:], domain[3:])  # 1 row of domain 0
    whole.update(logits, targets, domain)
    assert rank0._reductions["sum_loss"] is not None and rank0._reductions["total_items"] is not None
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.compute(), whole.compute())
    rows = domain == 0
    expected = F.cross_entropy(logits[rows].reshape(-1, 7), targets[rows].reshape(-1))
    torch.testing.assert_close(whole.compute(), expected)  # token-weighted, not an average of row means
    assert whole.tokens == 15


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_batch(tied):
    cfg = _config(tie_word_embeddings=tied)
    model = ComposerLlama(cfg)
    batch = _batch(batch_size=3, seq_len=10)
    # matmul parameters, counted on the module: everything but the embedding lookup, plus the
    # output head (a tied head reuses the embedding matrix but still multiplies)
    n = sum(p.numel() for name, p in model.model.named_parameters() if name != "tok_embeddings.weight")
    n += cfg.vocab_size * cfg.d_model if tied else 0
    assert cfg.matmul_params() == n
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 10
    assert model.flops_per_batch(batch) == 3 * 10 * (6 * n + attention)
    smaller = ComposerLlama(cfg.replace(n_layers=1, intermediate_size=20))
    assert smaller.flops_per_batch(batch) < model.flops_per_batch(batch)


def test_fsdp_and_activation_checkpointing_hooks_select_blocks():
    model = ComposerLlama(_config())
    chosen = [m for m in model.model.modules() if model.model.fsdp_wrap_fn(m)]
    assert len(chosen) == 2 and all(isinstance(m, Block) for m in chosen)
    assert [m for m in model.model.modules() if model.model.activation_checkpointing_fn(m)] == chosen
    # the hooks belong to the decoder itself: a bare Decoder (a teacher, say) carries them too
    bare = Decoder(_config())
    assert (
        not is_block(model.model)
        and bare.fsdp_wrap_fn(bare.layers[0])
        and bare.activation_checkpointing_fn(bare.layers[1])
    )


def test_meta_device_init_materialises_a_working_model():
    cfg = _config(init_std=0.05)
    model = ComposerLlama(cfg, DOMAINS, init_device="meta")
    assert all(p.is_meta for p in model.parameters())
    # what FSDP does with init_device: meta, module by module (root first)
    for module in model.model.modules():
        model.model.param_init_fn(module)
    params = dict(model.model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert torch.equal(params["layers.0.attention_norm.weight"], torch.ones(cfg.d_model))
    assert torch.equal(params["norm.weight"], torch.ones(cfg.d_model))
    for name in ("tok_embeddings.weight", "layers.1.feed_forward.w2.weight", "output.weight"):
        assert params[name].std().item() == pytest.approx(0.05, rel=0.1), name
    reference = Decoder(cfg)  # built normally: same RoPE table, same function for the same weights
    reference.load_state_dict(model.model.state_dict())
    assert torch.equal(model.model.inv_freq, reference.inv_freq)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(batch).logits, reference.eval()(batch["input_ids"]))
    loss = model.loss(model(batch), batch)["ce"].item()
    assert math.isfinite(loss) and abs(loss - math.log(cfg.vocab_size)) < 0.5


def test_init_module_reinitialises_one_module():
    model = ComposerLlama(_config(init_std=0.5))
    linear = model.model.layers[0].feed_forward.w1
    with torch.no_grad():
        linear.weight.zero_()
    init_module(linear, 0.5)
    assert linear.weight.std().item() == pytest.approx(0.5, rel=0.1)


def test_composer_trainer_fit_on_cpu():
    from composer import Trainer
    from composer.core import Evaluator
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = ComposerLlama(_config(), DOMAINS)
    rows = [_batch(0, 4)]
    samples = [
        {"input_ids": r, "domain": d, "idx": i} for b in rows for r, d, i in zip(*b.values(), strict=True)
    ]
    train = DataLoader(samples * 3, batch_size=4)
    eval_loader = DataLoader(samples, batch_size=4)
    losses: list[float] = []

    from composer.core import Callback

    class RecordLoss(Callback):
        def after_train_batch(self, state, logger):
            losses.append(float(state.loss["total"].detach()))

    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=Evaluator(label="eval", dataloader=eval_loader),
        max_duration="3ba",
        eval_interval="3ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
        callbacks=[RecordLoss()],
        device="cpu",
        precision="fp32",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    assert len(losses) == 3 and losses[2] < losses[0]  # same batch three times: the loss must fall
    eval_metrics = trainer.state.eval_metrics["eval"]
    values = {name: metric.compute().item() for name, metric in eval_metrics.items()}
    assert all(math.isfinite(v) for v in values.values())
    assert (
        values["absent_LanguageCrossEntropy"] == 0.0
        and eval_metrics["absent_LanguageCrossEntropy"].tokens == 0
    )
    assert values["web_LanguageCrossEntropy"] > 0 and values["code_LanguageCrossEntropy"] > 0
    trainer.close()


def test_train_metrics_of_a_domain_absent_from_a_batch_are_not_logged():
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader

    from llmshearing.training.builders import build_callbacks
    from llmshearing.training.run_config import CallbackSettings

    torch.manual_seed(0)
    model = ComposerLlama(_config(), DOMAINS)
    ids = _batch(0, 4)["input_ids"]
    domains = [[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 2, 1]]  # code is absent from batch 1, "absent" from 0 and 1
    samples = [
        {"input_ids": ids[j], "domain": torch.tensor(d[j]), "idx": torch.tensor(4 * b + j)}
        for b, d in enumerate(domains)
        for j in range(4)
    ]
    logger = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(samples, batch_size=4),
        max_duration="3ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        callbacks=build_callbacks(CallbackSettings(), ""),
        loggers=[logger],
        device="cpu",
        precision="fp32",
        progress_bar=False,
    )
    trainer.fit()

    def logged(domain: str) -> list[int]:
        return [int(t.batch) for t, _ in logger.data.get(f"metrics/train/{domain}_LanguageCrossEntropy", [])]

    everyone = logged("web")
    # Composer logs after every batch and again at the end of the epoch (the last batch's values)
    assert everyone == [0, 1, 2, 3]
    assert logged("code") == [0, 2, 3]
    assert logged("absent") == [2, 3]
    assert all(v > 0 for _, v in logger.data["metrics/train/code_LanguageCrossEntropy"])
    # every metric is back for the next batch
    assert set(trainer.state.train_metrics) == set(model.train_metrics)
    trainer.close()
