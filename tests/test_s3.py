"""S3 behaviour: concept specialization on factor data, pruning that removes experts and their compute, routing and
utility inspection, multi-task heads, the self-supervised stage, the sparsity sweep's files, the training recipe, and
clear errors on bad input."""

from __future__ import annotations

import csv

import peft
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmexperts import FeatureEncoderConfig, FeatureEncoderForClassification, S3Config
from mmexperts.training import Trainer, method_config, train
from mmexperts.training.sweep import SweepConfig, evaluate, fit, sparsity_sweep

from conftest import make_batch, make_classifier, tiny_config

TOKENS, DIM = 4, 8


def factor_batches(n: int, seed: int, batch: int = 64) -> tuple[list[dict], torch.Tensor]:
    """Two modalities of ``TOKENS`` tokens; each token shows one factor (a type signature plus a map of its latent),
    in a random order. Factor 0 is shared by both modalities and alone sets the label; the others are irrelevant.
    Returns the batches and a (n, tokens) mask of the label-relevant tokens, in the towers' token order
    ([CLS], modality a, [CLS], modality b)."""
    fixed = torch.Generator().manual_seed(1234)  # the same factor maps in every split
    signature = torch.randn(2, TOKENS, DIM, generator=fixed) * 2
    maps = torch.randn(2, TOKENS, 2, DIM, generator=fixed)
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 2, generator=generator)
    features, relevant = [], [torch.zeros(n, 1, dtype=torch.bool)]
    for modality in range(2):
        latents = torch.randn(n, TOKENS, 2, generator=generator)
        latents[:, 0] = shared
        tokens = signature[modality][None] + torch.einsum("ntl,tld->ntd", latents, maps[modality])
        order = torch.argsort(torch.rand(n, TOKENS, generator=generator), 1)
        features.append(torch.gather(tokens, 1, order[..., None].expand(-1, -1, DIM)))
        relevant += [order == 0, torch.zeros(n, 1, dtype=torch.bool)]
    labels = (shared.sum(1) > 0).long()
    batches = [{"features_a": features[0][i:i + batch], "features_b": features[1][i:i + batch],
                "labels": labels[i:i + batch]} for i in range(0, n, batch)]
    return batches, torch.cat(relevant[:-1], 1)


def feature_s3(num_experts: int = 4, seed: int = 0, **kwargs) -> peft.PeftModel:
    torch.manual_seed(seed)
    base = FeatureEncoderForClassification(FeatureEncoderConfig(feature_size_a=DIM, feature_size_b=DIM, hidden_size=16,
                                                                num_hidden_layers=1, num_labels=2))
    return peft.get_peft_model(base, S3Config(design="concepts", num_experts=num_experts, latent_size=16, **kwargs))


@pytest.fixture(scope="module")
def trained():
    """An S3 adapter trained on factor data, with its test batch and relevant-token mask."""
    model = feature_s3()
    train_batches, _ = factor_batches(512, seed=0)
    fit(model, train_batches, epochs=15, learning_rate=1e-2, weight_decay=1e-2)
    test, relevant = factor_batches(512, seed=1, batch=512)
    return model, test, relevant


def test_pruning_irrelevant_experts_keeps_accuracy_pruning_relevant_ones_loses_it(trained):
    model, test, relevant = trained
    tuner = model.base_model
    full = evaluate(model, test)["accuracy"]
    assert full > 0.95
    with torch.no_grad():
        assignments = model(**test[0]).concept_assignments  # (batch, tokens, K)
    real = torch.ones_like(relevant)
    real[:, [0, TOKENS + 1]] = False  # [CLS] tokens mix every factor
    relevance = (assignments * relevant[..., None]).sum((0, 1)) / (assignments * real[..., None]).sum((0, 1))
    label_relevant = relevance > 0.5
    assert 0 < int(label_relevant.sum()) < tuner.get_expert_mask().numel()  # concepts specialised
    try:
        tuner.set_expert_mask(label_relevant)  # prune every label-irrelevant expert
        assert evaluate(model, test)["accuracy"] >= full - 0.02
        tuner.set_expert_mask(~label_relevant)  # prune every label-relevant expert
        assert evaluate(model, test)["accuracy"] < full - 0.15
        tuner.restore_experts()
        utility = tuner.expert_utility(test)  # leave-one-out validation loss ranks the relevant experts first
        assert set(utility.topk(int(label_relevant.sum())).indices.tolist()) == set(
            label_relevant.nonzero().flatten().tolist())
    finally:
        tuner.restore_experts()


def test_pruning_experts_that_learned_a_spurious_nuisance_raises_test_accuracy():
    """Modality b's noise agrees with the label in train only: the experts that picked up this shortcut have negative
    leave-one-out validation utility; pruning them raises test accuracy and makes predictions stop following the
    nuisance, while keeping only the single most useful expert loses accuracy again (the reverse U)."""
    from mmexperts.offline.factors import build_factor_dataset
    from mmexperts.training.sweep import feature_loader

    data, latents = build_factor_dataset(num_train=384, num_validation=256, num_test=512, seq_len=4, dim_a=DIM,
                                         dim_b=DIM, synergy_dims=0, label_from=("shared", "unique_a"),
                                         spurious_strength=1.0, spurious_modalities="b", seed=2,
                                         return_latents=True)
    model = feature_s3(num_experts=6, seed=2)
    fit(model, feature_loader(data["train"], 64, shuffle=True, seed=2), epochs=12, learning_rate=1e-2,
        weight_decay=1e-2)
    validation, test = list(feature_loader(data["validation"], 256)), list(feature_loader(data["test"], 512))
    nuisance = torch.as_tensor(latents["test"]["noise_b"].sum(1) > 0)
    tuner = model.base_model

    def accuracy_and_nuisance_agreement():
        with torch.no_grad():
            predictions = model(**test[0]).logits.argmax(-1)
        return (predictions == test[0]["labels"]).float().mean(), (predictions == nuisance).float().mean()

    full, full_agreement = accuracy_and_nuisance_agreement()
    utility = tuner.expert_utility(validation)
    assert (utility < 0).any()  # some experts hurt held-out loss: the shortcut
    try:
        tuner.set_expert_mask(utility > 0)
        cleaned, cleaned_agreement = accuracy_and_nuisance_agreement()
        assert cleaned > full + 0.03
        assert cleaned_agreement < full_agreement - 0.05
        tuner.set_expert_mask(utility == utility.max())
        assert accuracy_and_nuisance_agreement()[0] < cleaned - 0.05
    finally:
        tuner.restore_experts()


@pytest.mark.parametrize("criterion", ["loss", "gate_mass", "usage", "gate_output_norm"])
def test_utilities_are_inspectable_and_nan_for_pruned_experts(trained, criterion):
    model, test, _ = trained
    tuner = model.base_model
    try:
        tuner.set_expert_mask(torch.tensor([True, True, False, True]))
        utility = tuner.expert_utility(test, criterion=criterion)
        assert utility.shape == (4,) and torch.isnan(utility[2]) and torch.isfinite(utility[[0, 1, 3]]).all()
        stats = tuner.routing_statistics(test)
        assert stats["routing_weights"].shape == (512, 4) and (stats["routing_weights"][:, 2] == 0).all()
        assert stats["concept_embeds"].shape == (512, 4, 16) and stats["logits"].shape == (512, 2)
    finally:
        tuner.restore_experts()


@pytest.mark.parametrize("schedule", ["one-shot", "progressive"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75])
def test_prune_removes_round_sparsity_times_k_experts(trained, sparsity, schedule):
    model, test, _ = trained
    tuner = model.base_model
    try:
        finetunes = []
        mask = tuner.prune(sparsity, test, criterion="gate_mass", pruning_schedule=schedule, on_prune=finetunes.append)
        assert int((~mask).sum()) == round(sparsity * 4)
        assert torch.equal(tuner.get_expert_mask(), mask)
        assert len(finetunes) == (round(sparsity * 4) if schedule == "progressive" else int(sparsity > 0))
    finally:
        tuner.restore_experts()


def test_pruned_experts_cost_no_compute():
    """Expert calls and FLOPs are counted, not assumed: each pruned expert removes its pooling and MLP FLOPs."""
    model = feature_s3(num_experts=8, init_weights=False).eval()
    batch = factor_batches(16, seed=0, batch=16)[0][0]
    experts = model.base_model._layers()["vision"].s3_core["default"].experts
    calls, original = [], experts.expert
    experts.expert = lambda index, tokens: calls.append(index) or original(index, tokens)

    def flops_and_calls(mask):
        model.base_model.set_expert_mask(mask)
        calls.clear()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = model(**batch)
        return counter.get_total_flops(), sorted(calls), out

    full_flops, full_calls, _ = flops_and_calls(torch.ones(8, dtype=torch.bool))
    mask = torch.tensor([True, False, True, False, False, True, True, False])
    pruned_flops, pruned_calls, out = flops_and_calls(mask)
    assert full_calls == list(range(8)) and pruned_calls == [0, 2, 5, 6]
    assert (out.concept_embeds[:, ~mask] == 0).all() and (out.routing_weights[..., ~mask] == 0).all()
    tokens = 2 * (TOKENS + 1)
    d, hidden = 16, 32
    per_expert = 16 * (2 * tokens * d + 2 * d * hidden + 2 * hidden * d)  # pooling + the expert's two matmuls
    gram = 2 * d * (8 ** 2 - 4 ** 2)  # the key-diversity loss over active keys
    assert full_flops - pruned_flops == 4 * per_expert + gram


def test_top_k_routing_runs_only_selected_experts():
    model = feature_s3(num_experts=6, top_k=2, init_weights=False).eval()
    with torch.no_grad():
        out = model(**factor_batches(8, seed=0, batch=8)[0][0])
    selected = out.routing_weights[0] > 0
    assert (selected.sum(-1) == 2).all()
    torch.testing.assert_close(out.routing_weights[0].sum(-1), torch.ones(8))
    assert (out.concept_embeds[~selected] == 0).all() and (out.concept_embeds[selected].abs().sum(-1) > 0).all()


def test_multi_task_heads_and_router_follow_task_ids():
    model = feature_s3(num_tasks=3, init_weights=False).eval()
    batch = factor_batches(6, seed=0, batch=6)[0][0]
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        mixed = model(**batch, task_ids=task_ids)
        for task in range(3):
            alone = model(**batch, task_ids=torch.full((6,), task))
            rows = task_ids == task
            torch.testing.assert_close(mixed.logits[rows], alone.logits[rows])
            torch.testing.assert_close(mixed.routing_weights[:, rows], alone.routing_weights[:, rows])
        other = model(**batch, task_ids=torch.full((6,), 1))
    assert not torch.allclose(mixed.logits[0], other.logits[0])


def test_sum_head_reads_the_fused_concepts():
    model = feature_s3(head_input="sum", init_weights=False).eval()
    core = model.base_model._layers()["vision"].s3_core["default"]
    assert core.head_weight.shape == (1, 16, 2)
    with torch.no_grad():
        out = model(**factor_batches(8, seed=0, batch=8)[0][0])
    torch.testing.assert_close(out.logits, out.fused_embeds @ core.head_weight[0] + core.head_bias[0])


def test_padding_does_not_change_the_concepts():
    config = S3Config(design="concepts", num_experts=4, latent_size=16, init_weights=False)
    model = peft.get_peft_model(make_classifier(), config).eval()
    batch = make_batch()
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][batch["attention_mask"] == 0] = 7  # other token ids behind the padding mask
    with torch.no_grad():
        a, b = model(**batch), model(**changed)
    torch.testing.assert_close(a.concept_embeds, b.concept_embeds)
    torch.testing.assert_close(a.logits, b.logits)
    assert (a.concept_assignments[:, -9:][batch["attention_mask"] == 0] == 0).all()


def test_self_supervised_stage_trains_without_labels():
    model = feature_s3(ssl_loss_weight=1.0)
    batch = {k: v for k, v in factor_batches(32, seed=0, batch=32)[0][0].items() if k != "labels"}
    model.train()
    out = model(**batch)
    assert out.ssl_loss > 0 and out.logits is not None
    torch.testing.assert_close(out.loss, out.ssl_loss + out.aux_loss)
    out.loss.backward()
    core = model.base_model._layers()["vision"].s3_core["default"]
    assert core.keys.grad.abs().sum() > 0 and core.experts.w1.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(**batch).get("ssl_loss") is None  # evaluation never draws augmented views



def test_standalone_concepts_core_resolves_a_default_ssl_weight_and_trains():
    """A core built from a bare config (ssl_loss_weight None, no adapter to resolve it) trains: 1.0 without a head,
    0.0 with one, as an attached adapter resolves it."""
    from mmexperts.s3 import S3Core

    torch.manual_seed(0)
    config = S3Config(design="concepts", num_experts=2, latent_size=8)
    assert config.ssl_loss_weight is None
    tokens, mask, experts = torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    for num_labels, weight in ((0, 1.0), (2, 0.0)):
        core = S3Core(config, num_labels).train()
        assert core.ssl_loss_weight == weight
        out = core(tokens, mask, experts)
        assert (out.ssl_loss is not None) == (weight > 0)
        loss = out.aux_loss + (weight * out.ssl_loss if out.ssl_loss is not None else 0)
        if out.logits is not None:
            loss = loss + out.logits.logsumexp(-1).mean()
        loss.backward()
        trained = core.experts.w1 if weight else core.head_weight  # zero-init heads pass no gradient to the experts
        assert torch.isfinite(loss) and trained.grad.abs().sum() > 0
    assert config.ssl_loss_weight is None  # the core reads a default; it does not write one into the shared config

def test_sparsity_sweep_writes_csv_and_plots(tmp_path):
    config = SweepConfig(num_train=64, num_eval=32, sparsities="0,0.5", seeds="0", num_experts=4, latent_size=8,
                         hidden_size=8, epochs=1, finetune_epochs=1, batch_size=32, criterion="gate_mass",
                         output_dir=str(tmp_path / "sweep"))
    result = sparsity_sweep(config)
    with open(result["files"]["sweep.csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["sparsity"], r["pruned"]) for r in rows] == [("0.0", "0"), ("0.5", "2")]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    for name in ("accuracy_vs_sparsity.png", "expert_usage.png"):
        assert (tmp_path / "sweep" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s["sparsity"] for s in result["summary"]] == [0.0, 0.5]


def test_recipe_trains_s3(backbones, tmp_path):  # noqa: F811
    results = train(tiny_config(backbones, tmp_path, method="s3",
                                method_config={"num_experts": 4, "latent_size": 16, "init_weights": False}))
    assert results["method"] == "s3" and 0 <= results["eval_accuracy"] <= 1
    assert (tmp_path / "adapter" / "routing.png").stat().st_size > 1000
    assert "S3" in (tmp_path / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("kwargs,match", [
    ({"top_k": 9}, "top_k must be an integer between 1 and 8"),
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"dispatch": "fast"}, "dispatch must be one of"),
    ({"ssl_token_drop": 1.0}, r"ssl_token_drop must be in \[0, 1\)"),
    ({"head_input": "mean"}, "head_input must be one of"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S3Config(**kwargs)
    if "top_k" in kwargs:
        with pytest.raises(ValueError, match="top_k"):
            method_config("s3", kwargs)


def test_bad_sparsity_masks_and_task_ids_are_clear_errors():
    model = feature_s3(num_tasks=2)
    tuner = model.base_model
    batch = factor_batches(8, seed=0, batch=8)[0]
    for sparsity in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be a fraction of experts to remove in \[0, 1\)"):
            tuner.prune(sparsity, batch)
    with pytest.raises(ValueError, match="leaving none"):
        tuner.prune(0.9, batch)  # round(0.9 * 4) = 4 experts
    with pytest.raises(ValueError, match="keeps none of the 4 experts"):
        tuner.set_expert_mask(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        tuner.set_expert_mask(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="criterion must be one of"):
        tuner.expert_utility(batch, criterion="magic")
    with pytest.raises(ValueError, match=r"Unknown task id\(s\) \[2, 5\].*\[0, 2\)"):
        model(**batch[0], task_ids=torch.tensor([0, 1, 2, 5, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="num_tasks=2 tasks; pass task_ids"):
        model(**batch[0])
    with pytest.raises(ValueError, match="token_layer must index one of the 1 blocks"):
        feature_s3(token_layer=3)
    assert tuner.active_experts() == [0, 1, 2, 3]  # nothing above changed the mask


def test_recipe_trains_the_paper_design_stage_one_with_its_probe(backbones, tmp_path):  # noqa: F811
    trainer = Trainer(tiny_config(backbones, tmp_path, method="s3", max_steps=4,
                                  method_config={"num_experts": 4, "latent_size": 16, "init_weights": False}))
    trainer.setup()
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.peft_config["default"].design == "paper" and model.peft_config["default"].stage == "specialization"
    before = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    batch = next(iter(trainer.train_loader))
    model.train()
    out = model(**trainer.model_inputs(batch))
    assert {"rep_loss", "dsc_loss"} <= set(out.keys()) and out.logits.shape == (batch["labels"].shape[0], 2)
    results = trainer.train()
    after = peft.get_peft_model_state_dict(model)
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    for tower in ("vision_model", "text_model"):  # stage 1 reaches both towers' routers, experts and projections
        for part in ("s3_encoder.blocks.0.moe.router", "s3_encoder.blocks.0.moe.experts", "s3_proj"):
            assert any(tower in key and part in key for key in moved), f"{tower} {part} did not train"
    assert any("s3_head" in key for key in moved)  # the online linear probe
    assert results["method"] == "s3" and 0 <= results["eval_accuracy"] <= 1
    assert '"design": "paper"' in (tmp_path / "adapter" / "adapter_config.json").read_text()
