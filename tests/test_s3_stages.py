"""S3's paper design: the three stages (self-supervised Specialization, router-only Selection with SupCon and
compactness, inference-time keep-ratio Sparsification), their losses against hand-computed values, the keep ratio
through save/load, and clear errors."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from peft import PeftModel

from mmexperts import S3Config
from mmexperts.errors import ConfigError
from mmexperts.moe import compactness_loss, keep_top_fraction, supervised_contrastive, top_k_weights

from conftest import make_batch, make_classifier, make_clip

VISION_TOKENS = 26  # (30 / 6)^2 patches + [CLS] of the tiny ViT


def paper_s3(base=None, seed: int = 0, **kwargs) -> PeftModel:
    base = make_classifier() if base is None else base
    torch.manual_seed(seed)
    defaults = {"design": "paper", "num_experts": 4, "top_k": 2, "latent_size": 16, "init_weights": False}
    return peft.get_peft_model(base, S3Config(**{**defaults, **kwargs}))


@torch.no_grad()
def token_pairs(model, batch) -> torch.Tensor:
    return model(**batch).token_routing_weights


def test_keep_top_fraction_keeps_the_highest_scoring_pairs():
    generator = torch.Generator().manual_seed(0)
    weights = top_k_weights(torch.randn(50, 8, generator=generator).softmax(-1), 2, renormalize=False)
    for ratio in (0.1, 0.3, 0.55, 0.9):
        kept = keep_top_fraction(weights, ratio)
        assert int((kept > 0).sum()) == math.ceil(ratio * 100)
        assert torch.equal(kept[kept > 0], weights[kept > 0])  # kept pairs keep their router weight
        dropped = (weights > 0) & (kept == 0)
        assert kept[kept > 0].min() >= weights[dropped].max()
    assert keep_top_fraction(weights, 1.0) is weights
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got 0"):
        keep_top_fraction(weights, 0)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_keep_ratio_keeps_that_fraction_of_each_batchs_pairs_highest_scores_first(ratio):
    model = paper_s3().eval()
    batch = make_batch()
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    full = token_pairs(model, batch)[0]  # one MoE layer: its router scores do not depend on the keep ratio
    real = torch.cat([torch.ones(4, VISION_TOKENS, dtype=torch.bool), batch["attention_mask"].bool()], 1)
    assert torch.equal((full > 0).sum(-1), 2 * real.long())  # top-2 of every real token, none on padding
    model.base_model.set_keep_ratio(ratio)
    pruned = token_pairs(model, batch)[0]
    for tokens in (slice(0, VISION_TOKENS), slice(VISION_TOKENS, None)):  # each modality's MoE layer on its own
        before, after = full[:, tokens], pruned[:, tokens]
        assert int((after > 0).sum()) == math.ceil(ratio * int((before > 0).sum()))
        assert torch.equal(after[after > 0], before[after > 0])
        assert after[after > 0].min() >= before[(before > 0) & (after == 0)].max()
    routing = model(**batch).routing_weights  # per example: mean kept weight over real tokens
    assert routing.shape == (2, 4, 4) and (routing.sum(-1) < 1).all()
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items()), "set_keep_ratio changed weights"


def test_keep_ratio_one_is_the_unpruned_model_exactly():
    model = paper_s3(num_layers=2).eval()
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch)
        model.base_model.set_keep_ratio(0.2)
        pruned = model(**batch)
        model.base_model.set_keep_ratio(1.0)
        again = model(**batch)
    assert not torch.allclose(pruned.fused_embeds, expected.fused_embeds)
    for key in ("logits", "fused_embeds", "routing_weights", "token_routing_weights", "aux_loss"):
        assert torch.equal(again[key], expected[key]), key
    real_pairs = (expected.token_routing_weights > 0).sum(-1)
    assert set(real_pairs.unique().tolist()) == {0, 2}  # every real token routed to exactly top_k experts


def test_selection_step_changes_only_the_routers():
    model = paper_s3()
    tuner = model.base_model
    tuner.set_stage("selection")
    selection = tuner.selection_parameters()
    names = {n for n, p in model.named_parameters() if any(p is q for q in selection)}
    assert names and all(".moe.router." in n for n in names)
    assert len(names) == 2  # one router per modality (one MoE layer each)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(selection, lr=1e-2)
    model.train()
    out = model(**make_batch())
    assert {"supcon_loss", "compactness_loss", "stage_loss"} <= set(out.keys()) and "rep_loss" not in out
    assert out.aux_loss == 0  # no balance loss in Selection
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == names


def test_specialization_loss_is_self_supervised_and_the_probe_reads_detached_features():
    model = paper_s3(rep_loss_weight=0.5, dsc_loss_weight=2.0)
    model.train()
    batch = make_batch()
    out = model(**batch)
    torch.testing.assert_close(out.stage_loss, 0.5 * out.rep_loss + 2.0 * out.dsc_loss)
    probe = model.base_model.task_loss(out.logits, batch["labels"])
    torch.testing.assert_close(out.loss, probe + out.aux_loss + out.stage_loss)
    probe.backward()  # the probe's loss trains the probe only
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert grads and all(".s3_head." in n for n in grads)
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)
    assert "stage_loss" not in evaluated  # evaluation never draws augmented views


def test_specialization_without_labels_on_a_headless_base():
    model = paper_s3(make_clip())
    model.train()
    batch = make_batch(with_labels=False)
    out = model(**batch)
    assert out.get("logits") is None
    torch.testing.assert_close(out.loss, out.aux_loss + out.rep_loss + out.dsc_loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_supervised_contrastive_against_hand_computed_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # a -> b scores [[1,1,0],[0,0,1],[1,1,0]], b -> a scores [[1,0,1],[1,0,1],[0,1,0]]; positives: same label
    big, small = math.log(2 * math.e + 1), math.log(math.e + 2)
    a_to_b = ((big - 1) + small + big) / 3
    b_to_a = ((big - 0.5) + (big - 0.5) + small) / 3
    torch.testing.assert_close(supervised_contrastive(a, b, labels, 1.0), torch.tensor((a_to_b + b_to_a) / 2))
    torch.testing.assert_close(supervised_contrastive(a, b, labels, 0.5), _supcon_reference(a, b, labels, 0.5))


def _supcon_reference(a, b, labels, temperature):
    """SupCon written out with loops, one anchor at a time."""
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    total = 0.0
    for anchors, others in ((a, b), (b, a)):
        for i in range(len(anchors)):
            scores = [float(anchors[i] @ others[j]) / temperature for j in range(len(others))]
            log_norm = math.log(sum(math.exp(s) for s in scores))
            positives = [j for j in range(len(others)) if labels[j] == labels[i]]
            total += -sum(scores[j] - log_norm for j in positives) / len(positives)
    return torch.tensor(total / (2 * len(a)))


def test_compactness_against_hand_computed_value():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([4, 4, 7])
    # unit rows (1,0), (0,1), (1,0); class means (1,1)/sqrt2 and (1,0): inner products 1/sqrt2, 1/sqrt2, 1
    torch.testing.assert_close(compactness_loss(z, labels), torch.tensor(-(math.sqrt(2) + 1) / 3))
    assert compactness_loss(torch.tensor([[1.0, 2.0], [2.0, 4.0]]), torch.tensor([1, 1])) == pytest.approx(-1.0)


def test_save_load_keeps_keep_ratio_stage_and_routers(tmp_path):
    model = paper_s3()
    tuner = model.base_model
    tuner.set_stage("selection")
    optimizer = torch.optim.SGD(tuner.selection_parameters(), lr=0.5)
    model.train()
    model(**make_batch()).loss.backward()
    optimizer.step()
    tuner.set_keep_ratio(0.4)
    model.eval()
    batch = make_batch(seed=1)
    expected = token_pairs(model, batch)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".moe.router." in n}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["design"], saved["keep_ratio"], saved["stage"]) == ("paper", 0.4, "selection")

    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path).eval()
    assert loaded.peft_config["default"].keep_ratio == 0.4
    assert all(torch.equal(routers[n], p) for n, p in loaded.named_parameters() if n in routers) and routers
    assert torch.equal(token_pairs(loaded, batch), expected)
    loaded.base_model.set_keep_ratio(1.0)  # the loaded adapter follows the runtime setter
    tuner.set_keep_ratio(1.0)
    assert torch.equal(token_pairs(loaded, batch), token_pairs(model, batch))
    assert not torch.equal(token_pairs(loaded, batch), expected)


def test_adapters_saved_without_a_design_load_as_concept_adapters(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(make_classifier(), S3Config(design="concepts", num_experts=4, latent_size=16,
                                                            init_weights=False)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["design"], config["keep_ratio"], config["stage"], config["num_layers"], config["num_heads"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(make_classifier(), tmp_path).eval()
    assert loaded.peft_config["default"].design == "concepts"
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).concept_embeds, model(**batch).concept_embeds)


def test_granularity_and_expansion():
    config = S3Config.from_granularity(4, 2)
    assert (config.num_experts, config.top_k, config.design) == (8, 4, "paper")
    assert S3Config().top_k == 2 and S3Config(num_experts=1).top_k == 1
    assert config.mlp_hidden_size == 4 * config.latent_size // 4  # the active experts add up to one dense 4d FFN


@pytest.mark.parametrize("kwargs,field,match", [
    ({"keep_ratio": 0.0}, "keep_ratio", r"keep_ratio must be in \(0, 1\], got 0.0"),
    ({"keep_ratio": 1.5}, "keep_ratio", r"keep_ratio must be in \(0, 1\], got 1.5"),
    ({"stage": "pruning"}, "stage", "stage must be one of"),
    ({"design": "slots"}, "design", "design must be one of"),
    ({"latent_size": 10, "num_heads": 4}, "num_heads", "num_heads=4 must divide latent_size=10"),
    ({"num_tasks": 2}, "num_tasks", "design='concepts'"),
    ({"design": "concepts", "keep_ratio": 0.5}, "keep_ratio", "belongs to design='paper'"),
    ({"top_k": 9}, "top_k", "top_k must be an integer between 1 and 8"),
])
def test_bad_config_is_a_config_error_naming_the_field(kwargs, field, match):
    with pytest.raises(ConfigError, match=match) as error:
        S3Config(**kwargs)
    assert error.value.field == field
    with pytest.raises(ConfigError, match="granularity must be a positive integer, got 0"):
        S3Config.from_granularity(0, 2)


def test_runtime_setters_and_design_mixups_are_clear_errors():
    model = paper_s3()
    tuner = model.base_model
    with pytest.raises(ConfigError, match=r"keep_ratio must be in \(0, 1\], got 0"):
        tuner.set_keep_ratio(0)
    with pytest.raises(ConfigError, match="stage must be one of"):
        tuner.set_stage("sparsification")
    assert model.peft_config["default"].keep_ratio == 1.0 and model.peft_config["default"].stage == "specialization"
    with pytest.raises(ValueError, match="belong to S3's concepts design.*set_keep_ratio"):
        tuner.get_expert_mask()
    tuner.set_stage("selection")
    model.train()
    with pytest.raises(ValueError, match="selection stage trains the routers with labels"):
        model(**make_batch(with_labels=False))
    with pytest.raises(ValueError, match="one integer class label per example"):
        model(**{**make_batch(), "labels": torch.rand(4)})
    concepts = peft.get_peft_model(make_classifier(), S3Config(design="concepts", num_experts=4, latent_size=16))
    with pytest.raises(ValueError, match="belongs to S3's paper design.*design='concepts'"):
        concepts.base_model.set_keep_ratio(0.5)
    with pytest.raises(ValueError, match="paper design"):
        concepts.base_model.selection_parameters()


def test_dropped_pairs_cost_no_expert_compute():
    model = paper_s3().eval()
    batch = make_batch()
    rows = []
    for layer in model.base_model._layers().values():
        experts = layer.s3_encoder["default"].blocks[0].moe.experts
        original = experts.expert
        experts.expert = lambda index, tokens, run=original: rows.append(tokens.shape[0]) or run(index, tokens)

    def expert_rows(ratio):
        model.base_model.set_keep_ratio(ratio)
        rows.clear()
        pairs = int((token_pairs(model, batch) > 0).sum())
        return sum(rows), pairs

    full_rows, full_pairs = expert_rows(1.0)
    pruned_rows, pruned_pairs = expert_rows(0.3)
    assert full_rows == full_pairs and pruned_rows == pruned_pairs  # each expert runs on its kept pairs only
    assert pruned_rows < 0.35 * full_rows
