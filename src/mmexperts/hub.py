"""Model cards rendered from ``model_cards/<method>.md`` and a push to the Hub that keeps PEFT's card metadata.

transformers' ``push_to_hub`` replaces the README that ``PeftModel.save_pretrained`` writes with a generic card
(``library_name: transformers``). For mmexperts adapters, :func:`push_adapter_to_hub` saves with PEFT, renders the
method's card (``library_name: peft``, an ``mmexperts`` tag) and uploads the folder. ``model.push_to_hub`` stays
PEFT's own (it
uploads the adapter and its config under transformers' generic card); nothing in PEFT is patched.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from peft import PeftModel

from .atomic import write_file_atomic

TEMPLATES = Path(__file__).parent / "model_cards"
LIBRARY_TAG = "mmexperts"
BACKBONE_REPORT = "report.json"  # written by mmexperts.offline.backbones next to the synthetic towers it builds
PROBE_NOTE = ("`{a}_only_*` and `{b}_only_*` are single-modality baselines: a linear probe fitted on the pooled "
              "features of one frozen tower alone (adapter disabled, no fusion), trained on the training split and "
              "scored on the same evaluation split as the adapter.")
PROBED_TOWERS = ("vision", "text", "modality_a", "modality_b")  # `<tower>_only_<metric>` keys of the probes
# Config entries the snippet that rebuilds a base from its config leaves out: bookkeeping, or derived from id2label.
UNSHOWN_CONFIG_KEYS = ("transformers_version", "model_type", "architectures", "_name_or_path", "label2id")
SIZE_CONFIG_KEYS = ("feature_size_a", "feature_size_b", "hidden_size", "num_hidden_layers")  # always shown, first


def _is_local(name: str) -> bool:
    return bool(name) and os.path.isdir(name)


def base_model_names(base) -> dict[str, str]:
    """What the adapter's base model was built from: ``{"base": name}`` for a model loaded whole with
    ``from_pretrained``, else ``{"vision": name, "text": name}`` for two towers loaded one by one (as the recipe does);
    local folders as absolute paths. Empty when nothing was recorded (a model built from configs)."""
    config = base.config
    names = {"base": getattr(config, "_name_or_path", "") or ""}
    if not names["base"]:
        names = {tower: getattr(getattr(config, f"{tower}_config", None), "_name_or_path", "") or ""
                 for tower in ("vision", "text")}
    return {key: str(Path(name).resolve()) if _is_local(name) else name for key, name in names.items() if name}


def _describe(name: str) -> str:
    """One tower or base: its Hub id, or its local folder (and how to rebuild it when mmexperts built it)."""
    if not _is_local(name):
        return f"[`{name}`](https://huggingface.co/{name})"
    report_file = Path(name).parent / BACKBONE_REPORT
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        return f"`{name}` (a local folder; the snippet below loads it from there)"
    return (f"`{name}` (a tiny backbone pretrained offline by mmexperts; "
            f"`mmexperts.offline.backbones.pretrained_backbones(seed={report.get('seed')}, "
            f"image_size={report.get('image_size')})` rebuilds it identically anywhere)")


def _import_line(cls: type) -> str:
    """The shortest import of ``cls``: from the package root when it exports the class, else from its module."""
    for package in ("mmexperts", "transformers"):  # both loaded by now; read, not imported (the root imports hub)
        if getattr(sys.modules.get(package), cls.__name__, None) is cls:
            return f"from {package} import {cls.__name__}"
    return f"from {cls.__module__} import {cls.__name__}"


def _config_snippet(base, seed: int) -> str:
    """Python lines that rebuild a base built from its config with random weights (a frozen feature encoder) from the
    torch seed it was drawn from: its sizes and the config's other fields that differ from their defaults, then the
    same draw."""
    cls, config = type(base), base.config
    defaults = type(config)().to_dict()
    fields = {key: value for key, value in config.to_diff_dict().items() if key not in UNSHOWN_CONFIG_KEYS
              and (key in SIZE_CONFIG_KEYS or defaults.get(key) != value)}
    fields = {**{key: fields[key] for key in SIZE_CONFIG_KEYS if key in fields}, **fields}
    imports = [_import_line(cls), _import_line(type(config))]
    if all(line.startswith("from mmexperts import ") for line in imports):
        imports = [f"from mmexperts import {type(config).__name__}, {cls.__name__}"]
    sources = [] if hasattr(config, "feature_size_a") else [  # image-text towers still need a processor and tokenizer
        'vision = text = "path/to/processor-and-tokenizer"  # not recorded: the towers were drawn from their config']
    return "\n".join([*imports, "",
                      f"torch.manual_seed({seed})  # the frozen towers are random: this seed and config draw them",
                      f"base = {cls.__name__}({type(config).__name__}(" + ",".join(
                          f"\n    {key}={value!r}" for key, value in fields.items()) + "))", *sources])


def _base_snippet(base, names: dict[str, str], base_seed: int | None = None) -> str:
    """Python lines that rebuild the base model exactly as the adapter needs it, defining ``base`` and, for towers
    loaded from folders or the Hub, ``vision`` and ``text`` (the towers' processor and tokenizer sources). A base
    built from its config with random weights is drawn again from ``base_seed``."""
    cls, config = type(base), base.config
    if not names and base_seed is not None:
        return _config_snippet(base, base_seed)
    lines = [_import_line(cls), ""]
    if "base" in names:
        lines += [f"vision = text = {names['base']!r}",
                  f"base = {cls.__name__}.from_pretrained(vision)"]
    elif {"vision", "text"} <= set(names) and hasattr(cls, "from_vision_text_pretrained"):
        keywords = {}
        if hasattr(config, "classifier_input"):  # the head's shape and task must match the saved head
            keywords = {"num_labels": config.num_labels, "problem_type": config.problem_type,
                        "classifier_input": config.classifier_input, "id2label": dict(config.id2label)}
        elif getattr(config, "projection_dim", None) not in (None, 512):
            keywords = {"projection_dim": config.projection_dim}
        lines += [f"vision, text = {names['vision']!r}, {names['text']!r}  # the frozen towers it was trained on",
                  f"base = {cls.__name__}.from_vision_text_pretrained(vision, text" + "".join(
                      f",\n    {key}={value!r}" for key, value in keywords.items()) + ")"]
    else:
        lines += ['vision = text = "path/to/base"  # the base model the adapter was trained on (not recorded)',
                  f"base = {cls.__name__}.from_pretrained(vision)"]
    return "\n".join(lines)


def _metric_rows(metrics: dict) -> list[tuple[str, object]]:
    """The card's evaluation rows; single-modality figures are marked as frozen linear probes."""
    rows = []
    for key, value in metrics.items():
        tower = next((t for t in PROBED_TOWERS if key.startswith(f"{t}_only_")), None)
        rows.append((f"{key} (frozen linear probe, {tower.replace('_', ' ')} tower alone)" if tower else key, value))
    return rows


def _probe_note(metrics: dict) -> str:
    """The note under the evaluation table when it holds single-modality probes, naming their towers."""
    probed = [tower for tower in PROBED_TOWERS if any(key.startswith(f"{tower}_only_") for key in metrics)]
    return PROBE_NOTE.format(a=probed[0], b=probed[-1]) if probed else ""


def write_model_card(model: PeftModel, folder: str | os.PathLike, repo_id: str | None = None,
                     adapter_name: str = "default", dataset: str | None = None, metrics: dict | None = None,
                     routing_plot: str | None = None, tags: list[str] | None = None,
                     adapter_path: str | None = None, for_hub: bool = False,
                     plots: list[str] | None = None, base_seed: int | None = None) -> ModelCard:
    """Render the method's card template over the README that PEFT wrote into ``folder`` (keeping its metadata).

    ``base_model`` names what the base was built from (its Hub ids, or local folders as absolute paths; for the Hub,
    ``for_hub=True``, local paths stay out of the metadata, which takes model ids only, and are named in the text).
    "How to use" rebuilds that base and loads the adapter from ``adapter_path`` (default: ``repo_id``, else
    ``folder``), and runs as written. ``routing_plot`` and ``plots`` name PNG files in ``folder`` that the card shows
    (the template decides where: MoPE and S3 show the routing plot, Alt-MoE its plots). ``base_seed``: the torch
    seed a base built from its config with random weights (the recipe's frozen feature towers) was drawn from; the
    card then rebuilds it from that seed and its config, and feeds it feature sequences.
    """
    config = model.peft_config[adapter_name]
    method = config.peft_type.value.lower()
    readme = Path(folder) / "README.md"
    card_data = ModelCard.load(readme).data if readme.exists() else ModelCard("").data
    card_data.library_name = "peft"
    names = base_model_names(model.get_base_model())
    listed = [name for name in dict.fromkeys(names.values()) if not (for_hub and _is_local(name))]
    card_data.base_model = listed or None  # never an empty base_model: the Hub refuses it
    card_data.base_model_relation = "adapter" if listed else None
    # PEFT tags 'base_model:adapter:<name>' (empty for a base built from configs); the Hub derives these tags from
    # base_model itself, so PEFT's are dropped rather than left empty or pointing at a local path.
    card_data.tags = sorted({tag for tag in card_data.tags or [] if not tag.startswith("base_model:")}
                            | {LIBRARY_TAG, method, "peft", "mixture-of-experts"} | set(tags or []))
    if dataset:
        card_data.datasets = [dataset]
    trainable, total = model.get_nb_trainable_parameters()
    skipped = {"peft_type", "task_type", "auto_mapping", "revision", "inference_mode", "target_modules"}
    rows = [(k, v) for k, v in sorted(config.to_dict().items()) if k not in skipped and v is not None]
    described = {"base": "Base model", "vision": "Vision tower", "text": "Text tower"}
    base = model.get_base_model()
    drawn = not names and base_seed is not None
    base_lines = [f"- {described[key]}: {_describe(name)}" for key, name in names.items()] or [
        f"- Base model: `{type(base).__name__}`, frozen towers with random weights drawn from torch seed {base_seed} "
        "(the snippet below draws them again)" if drawn else "- Base model: not recorded (a model built from configs)"]
    feature_sizes = [getattr(base.config, f"feature_size_{m}", None) for m in ("a", "b")]
    feature_inputs = (f'inputs = {{"features_a": torch.randn(1, 8, {feature_sizes[0]}),  # your feature sequences '
                      f'(batch, steps, dim)\n          "features_b": torch.randn(1, 8, {feature_sizes[1]})}}'
                      if None not in feature_sizes else "")
    if adapter_path is None:
        adapter_path = repo_id or str(Path(folder).resolve())
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / f"{method}.md"),
        model_name=repo_id or f"{method} adapter", repo_id=repo_id or "path/to/adapter",
        base_model=", ".join(names.values()), base_lines="\n".join(base_lines),
        load_base=_base_snippet(base, names, base_seed), adapter_literal=repr(str(adapter_path)),
        feature_inputs=feature_inputs,
        dataset=dataset, metrics=dict(_metric_rows(metrics or {})),
        probe_note=_probe_note(metrics or {}),
        routing_plot=routing_plot, plots=list(plots or []), config_rows=rows,
        trainable_parameters=f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        prompted_tower=getattr(config, "prompted_tower", ""),
        complementary_tower=getattr(config, "complementary_tower", ""),
        num_experts=getattr(config, "num_experts", ""),
    )
    write_file_atomic(readme, str(card))
    return card


def push_adapter_to_hub(model: PeftModel, repo_id: str, *, commit_message: str | None = None,
                        private: bool | None = None, token: str | None = None, revision: str | None = None,
                        create_pr: bool = False, tags: list[str] | None = None, dataset: str | None = None,
                        metrics: dict | None = None, extra_files: dict | None = None, base_seed: int | None = None,
                        **save_kwargs):
    """Save with PEFT, render the method's model card, and upload the folder in one commit.

    ``extra_files`` maps names in the repo to local files (e.g. a routing plot) uploaded alongside; ``base_seed`` as
    in :func:`write_model_card`.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **{k: v for k, v in save_kwargs.items() if k != "max_shard_size"})
        for name, path in (extra_files or {}).items():
            target = Path(folder) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(path).read_bytes())
        plots = [name for name in extra_files or {} if name.endswith(".png")]
        routing_plot = "routing.png" if "routing.png" in plots else next(iter(plots), None)
        adapter_name = "default" if "default" in model.peft_config else next(iter(model.peft_config))
        write_model_card(model, folder, repo_id, adapter_name, dataset, metrics, routing_plot, tags, for_hub=True,
                         plots=plots, base_seed=base_seed)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or "Upload mmexperts adapter")
