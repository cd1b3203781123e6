"""Model cards and Hub pushes (``mmexperts.hub``) on tiny bases: the card's metadata (``library_name: peft``,
``base_model`` ids only, PEFT's own fields kept), the base it names and how its snippet rebuilds it (the import line,
a whole base, two towers, a base drawn from a seed: each compiled, the base part run), evaluation rows, and
``push_adapter_to_hub``'s extra files, plots, commit options and adapter choice (uploads intercepted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import BertModel, VisionTextDualEncoderModel, ViTModel

from mmexperts import (
    AltMoEConfig,
    MoPEConfig,
    S3Config,
    VisionTextModelForClassification,
    push_adapter_to_hub,
    write_model_card,
)

from conftest import bert_config, make_batch, make_classifier, make_clip, vit_config

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # PEFT reads a deprecated attribute
MOPE = dict(init_weights=False, num_experts=2, prompt_length=2, static_prompt_length=1, complementary_prompt_length=1)
ALTMOE = dict(num_experts=2, top_k=1, hidden_size=8, dropout=0.0, init_weights=False)


class CustomClassifier(VisionTextModelForClassification):
    """A user's subclass, exported by neither mmexperts nor transformers."""


def mope(base) -> peft.PeftModel:
    """A MoPE adapter with random weights (seeded) on ``base``."""
    torch.manual_seed(1)
    return peft.get_peft_model(base, MoPEConfig(**MOPE)).eval()


def card_for(model: peft.PeftModel, folder: Path, **kwargs) -> tuple[ModelCard, str]:
    """Save ``model`` with PEFT into ``folder``, render its card there; return the card and its snippet."""
    model.save_pretrained(folder)
    card = write_model_card(model, folder, **kwargs)
    assert (folder / "README.md").read_text() == str(card)
    return card, snippet_of(card)


def snippet_of(card: ModelCard) -> str:
    """The card's "How to use" Python block, checked to compile."""
    snippet = re.search(r"```python\n(.*?)```", str(card), re.S).group(1)
    compile(snippet, "README.md", "exec")
    return snippet


def run_base_part(snippet: str) -> dict:
    """Run the snippet up to its processor and tokenizer (the base and the adapter), return its namespace."""
    namespace: dict = {"__name__": "__card__"}
    exec(compile(snippet[:snippet.index("\nprocessor, tokenizer")], "README.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[str, str]:
    """Tiny random ViT and BERT folders (seeded)."""
    folder = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    ViTModel(vit_config()).save_pretrained(folder / "vision")
    BertModel(bert_config()).save_pretrained(folder / "text")
    return str(folder / "vision"), str(folder / "text")


@pytest.fixture
def whole_base(tmp_path) -> Path:
    """A tiny classifier saved whole, to be loaded with ``from_pretrained``."""
    make_classifier().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_card_metadata_is_peft_names_the_base_and_keeps_the_readmes_own_fields(tmp_path, whole_base):
    model = mope(VisionTextModelForClassification.from_pretrained(whole_base))
    model.save_pretrained(tmp_path / "adapter")
    readme = ModelCard.load(tmp_path / "adapter" / "README.md")
    readme.data.license = "mit"  # a field the author added to PEFT's README
    readme.save(tmp_path / "adapter" / "README.md")
    card = write_model_card(model, tmp_path / "adapter", dataset="synthetic:entailment", tags=["demo", "peft"])
    data = ModelCard.load(tmp_path / "adapter" / "README.md").data
    assert data.library_name == "peft" and data.license == "mit"
    assert data.base_model == [str(whole_base.resolve())] and data.base_model_relation == "adapter"
    assert data.tags == sorted(data.tags) and {"mmexperts", "mope", "peft", "mixture-of-experts", "demo"} <= set(
        data.tags)
    assert not any(tag.startswith("base_model:") for tag in data.tags)
    assert data.datasets == ["synthetic:entailment"]
    assert f"- Base model: `{whole_base.resolve()}` (a local folder" in card.text
    assert "- Dataset: synthetic:entailment" in card.text
    assert "| `num_experts` | `2` |" in card.text and "peft_type" not in card.text


def test_snippet_of_a_base_loaded_whole_loads_that_folder_and_the_adapter(tmp_path, whole_base):
    model = mope(VisionTextModelForClassification.from_pretrained(whole_base))
    _, snippet = card_for(model, tmp_path / "adapter")
    assert "from mmexperts import VisionTextModelForClassification\n" in snippet
    assert f"vision = text = {str(whole_base.resolve())!r}" in snippet
    assert "base = VisionTextModelForClassification.from_pretrained(vision)" in snippet
    loaded = run_base_part(snippet)["model"]
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_mope_on_a_dual_encoder_of_two_towers_saves_its_random_projections_so_the_snippet_gives_its_outputs(
        tmp_path, towers):
    torch.manual_seed(0)
    base = VisionTextDualEncoderModel.from_vision_text_pretrained(*towers, projection_dim=16)
    model = mope(base)
    assert model.peft_config["default"].modules_to_save == ["text_projection", "visual_projection"]
    _, snippet = card_for(model, tmp_path / "adapter")
    torch.manual_seed(5)  # the snippet's base draws other projections; the adapter brings the trained ones
    namespace = run_base_part(snippet)
    batch = make_batch(with_labels=False)
    with torch.no_grad():
        loaded, trained = namespace["model"](**batch), model(**batch)
    torch.testing.assert_close(loaded.logits_per_image, trained.logits_per_image, rtol=0, atol=0)
    whole = tmp_path / "whole"  # a dual encoder loaded whole keeps its projections frozen (nothing random in it)
    base.save_pretrained(whole)
    assert mope(VisionTextDualEncoderModel.from_pretrained(whole)).peft_config["default"].modules_to_save is None


def test_snippet_of_two_towers_rebuilds_the_dual_encoder_with_its_projection_size(tmp_path, towers):
    torch.manual_seed(0)
    base = VisionTextDualEncoderModel.from_vision_text_pretrained(*towers, projection_dim=16)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, AltMoEConfig(**ALTMOE)).eval()
    card, snippet = card_for(model, tmp_path / "adapter")
    vision, text = (str(Path(p).resolve()) for p in towers)
    assert card.data.base_model == [vision, text]
    assert "from transformers import VisionTextDualEncoderModel\n" in snippet
    assert f"vision, text = {vision!r}, {text!r}" in snippet and "projection_dim=16)" in snippet
    assert f"- Vision tower: `{vision}`" in card.text and f"- Text tower: `{text}`" in card.text
    namespace = run_base_part(snippet)
    assert namespace["base"].config.projection_dim == 16
    batch = make_batch(with_labels=False)
    with torch.no_grad():
        loaded, trained = namespace["model"](**batch), model(**batch)
    for field in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(loaded[field], trained[field], rtol=0, atol=0)


def test_a_tower_mmexperts_built_offline_is_named_with_the_call_that_rebuilds_it(tmp_path, towers):
    report = Path(towers[0]).parent / "report.json"
    report.write_text(json.dumps({"seed": 3, "image_size": 32}))
    try:
        base = VisionTextModelForClassification.from_vision_text_pretrained(*towers, num_labels=3)
        card, _ = card_for(mope(base), tmp_path / "adapter")
    finally:
        report.unlink()
    assert card.text.count("`mmexperts.offline.backbones.pretrained_backbones(seed=3, image_size=32)` rebuilds it "
                           "identically anywhere") == 2


@pytest.mark.parametrize("make_base, import_line", [
    (make_classifier, "from mmexperts import VisionTextModelForClassification"),
    (lambda: CustomClassifier(make_classifier().config), f"from {__name__} import CustomClassifier"),
], ids=["mmexperts", "elsewhere"])
def test_an_unrecorded_base_gets_a_placeholder_path_and_no_base_model_metadata(tmp_path, make_base, import_line):
    card, snippet = card_for(mope(make_base()), tmp_path / "adapter")
    assert import_line + "\n" in snippet
    assert 'vision = text = "path/to/base"' in snippet
    assert "- Base model: not recorded (a model built from configs)" in card.text
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()


@pytest.mark.parametrize("make_base, import_line", [
    (make_clip, "from transformers import CLIPModel\nfrom transformers import CLIPConfig\n"),
    (make_classifier, "from mmexperts import VisionTextClassificationConfig, VisionTextModelForClassification\n"),
], ids=["transformers", "mmexperts"])
def test_a_base_drawn_from_a_seed_is_drawn_again_identically(tmp_path, make_base, import_line):
    base = make_base()  # seeded 0
    expected = {key: value.clone() for key, value in base.state_dict().items()}
    config = AltMoEConfig(**ALTMOE) if make_base is make_clip else MoPEConfig(**MOPE)
    card, snippet = card_for(peft.get_peft_model(base, config), tmp_path / "adapter", base_seed=0)
    assert import_line in snippet and "torch.manual_seed(0)" in snippet
    assert "random weights drawn from torch seed 0" in card.text and "base_model" not in card.data.to_dict()
    start = snippet.index(import_line)
    namespace: dict = {}
    exec(compile("import torch\n" + snippet[start:snippet.index("\nmodel = PeftModel")], "README.md", "exec"),
         namespace)
    drawn = namespace["base"].state_dict()
    assert drawn.keys() == expected.keys()
    assert all(torch.equal(drawn[key], expected[key]) for key in expected)


def test_hub_ids_are_linked_and_kept_while_local_folders_stay_out_of_hub_metadata(tmp_path, whole_base):
    base = make_classifier()
    base.config._name_or_path = "someone/tiny-base"
    model = mope(base)
    for for_hub in (False, True):
        card, snippet = card_for(model, tmp_path / f"hub-id-{for_hub}", for_hub=for_hub)
        assert card.data.base_model == ["someone/tiny-base"]
        assert "- Base model: [`someone/tiny-base`](https://huggingface.co/someone/tiny-base)" in card.text
        assert "vision = text = 'someone/tiny-base'" in snippet
    local = mope(VisionTextModelForClassification.from_pretrained(whole_base))
    card, snippet = card_for(local, tmp_path / "local", repo_id="someone/adapter", for_hub=True)
    assert "base_model" not in card.data.to_dict()
    assert str(whole_base.resolve()) in card.text and str(whole_base.resolve()) in snippet
    assert "PeftModel.from_pretrained(base, 'someone/adapter')" in snippet and card.text.startswith("\n# someone/")


def test_the_snippet_loads_the_adapter_from_adapter_path_else_the_repo_id_else_the_folder(tmp_path):
    model = mope(make_classifier())
    folder = tmp_path / "adapter"
    for kwargs, literal in (({}, repr(str(folder.resolve()))), ({"repo_id": "someone/x"}, "'someone/x'"),
                            ({"repo_id": "someone/x", "adapter_path": "elsewhere/x"}, "'elsewhere/x'")):
        _, snippet = card_for(model, folder, **kwargs)
        assert f"model = PeftModel.from_pretrained(base, {literal}).eval()" in snippet


def test_evaluation_rows_mark_single_modality_probes_and_the_note_names_their_towers(tmp_path):
    model = mope(make_classifier())
    card, _ = card_for(model, tmp_path / "plain")
    assert "## Evaluation" not in card.text and "## Routing" not in card.text
    for towers in (("vision", "text"), ("modality_a", "modality_b")):
        metrics = {"eval_accuracy": 0.75, f"{towers[0]}_only_accuracy": 0.5, f"{towers[1]}_only_accuracy": 0.25}
        card, _ = card_for(model, tmp_path / towers[0], metrics=metrics, routing_plot="routing.png")
        assert "| eval_accuracy | 0.75 |" in card.text
        for tower in towers:
            assert (f"| {tower}_only_accuracy (frozen linear probe, {tower.replace('_', ' ')} tower alone) |"
                    in card.text)
        assert f"`{towers[0]}_only_*` and `{towers[1]}_only_*` are single-modality baselines" in card.text
        assert "## Routing\n\n![routing](routing.png)" in card.text


def test_push_uploads_extra_files_shows_the_routing_plot_and_passes_the_commit_options(tmp_path, fake_hub):
    model = mope(make_classifier())
    (tmp_path / "routing.png").write_bytes(b"\x89PNG routing")
    (tmp_path / "loss.png").write_bytes(b"\x89PNG loss")
    url = push_adapter_to_hub(model, "someone/pushed", revision="main", create_pr=True, dataset="synthetic:entailment",
                              extra_files={"plots/loss.png": tmp_path / "loss.png",
                                           "routing.png": tmp_path / "routing.png"})
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "someone/pushed" and "someone/pushed" in url
    assert upload["kwargs"]["commit_message"] == "Upload mmexperts adapter"
    assert upload["kwargs"]["revision"] == "main" and upload["kwargs"]["create_pr"] is True
    assert upload["files"]["plots/loss.png"] == b"\x89PNG loss" and upload["files"]["routing.png"] == b"\x89PNG routing"
    card = ModelCard(upload["files"]["README.md"].decode())
    assert "![routing](routing.png)" in card.text  # routing.png is preferred over the first plot
    assert card.data.datasets == ["synthetic:entailment"] and "PeftModel.from_pretrained(base, 'someone/pushed')" in (
        card.text)


def test_push_cards_the_only_adapter_whatever_its_name_and_takes_save_options(tmp_path, fake_hub):
    torch.manual_seed(1)
    model = peft.get_peft_model(make_classifier(), MoPEConfig(**{**MOPE, "num_experts": 3}), adapter_name="other")
    (tmp_path / "curve.png").write_bytes(b"\x89PNG curve")
    push_adapter_to_hub(model, "someone/other", commit_message="First upload", max_shard_size="1MB",
                        extra_files={"curve.png": tmp_path / "curve.png"})
    (upload,) = fake_hub.uploads
    assert upload["kwargs"]["commit_message"] == "First upload"
    assert "other/adapter_config.json" in upload["files"]  # PEFT's layout for a non-default adapter name
    card = ModelCard(upload["files"]["README.md"].decode())
    assert "| `num_experts` | `3` |" in card.text
    assert "![routing](curve.png)" in card.text  # without routing.png, the first plot


def test_a_seeded_image_text_base_snippet_defines_its_processor_sources(tmp_path):
    import ast

    model = peft.get_peft_model(make_clip(), AltMoEConfig(num_experts=2, top_k=1, hidden_size=8))
    model.save_pretrained(tmp_path)
    snippet = re.search(r"```python\n(.*?)```", str(write_model_card(model, tmp_path, base_seed=0)), re.S).group(1)
    assigned = {name.id for node in ast.walk(ast.parse(snippet)) if isinstance(node, ast.Assign)
                for target in node.targets for name in ast.walk(target) if isinstance(name, ast.Name)}
    used = {node.id for node in ast.walk(ast.parse(snippet)) if isinstance(node, ast.Name)}
    assert {"vision", "text"} & used <= assigned  # no NameError: the placeholder says what to give
    assert "path/to/processor-and-tokenizer" in snippet


@pytest.mark.parametrize("method", ["mope", "s3", "altmoe"])
def test_card_names_the_fields_and_settings_the_adapter_has(tmp_path, method):
    torch.manual_seed(1)
    if method == "mope":
        model, batch = mope(make_classifier()), make_batch()
    elif method == "s3":
        model = peft.get_peft_model(make_classifier(), S3Config(num_experts=4, top_k=2, latent_size=16)).eval()
        batch = make_batch()
    else:
        model, batch = peft.get_peft_model(make_clip(), AltMoEConfig(**ALTMOE)).eval(), make_batch(with_labels=False)
    card, snippet = card_for(model, tmp_path / "adapter")
    with torch.no_grad():
        out = model(**batch)
    named = set(re.findall(r"\bout\.(\w+)", snippet))
    assert named <= set(out.keys()), f"the card names fields the output lacks: {named - set(out.keys())}"
    assert named or method != "altmoe"
    assert "None" not in card.text.split("## How to use")[0], "a setting the card reads is missing from the config"
    if method == "s3":
        assert "projected to width 16 and encoded by" in card.text
