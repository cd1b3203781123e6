"""Model cards rendered from ``model_cards/<method>.md`` and a push to the Hub that keeps PEFT's card metadata.

transformers' ``push_to_hub`` replaces the README that ``PeftModel.save_pretrained`` writes with a generic card
(``library_name: transformers``). For mmexperts adapters, :func:`push_adapter_to_hub` saves with PEFT, renders the
method's card (``library_name: peft``, an ``mmexperts`` tag) and uploads the folder. ``model.push_to_hub`` stays PEFT's own (it
uploads the adapter and its config under transformers' generic card); nothing in PEFT is patched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from peft import PeftModel


TEMPLATES = Path(__file__).parent / "model_cards"
LIBRARY_TAG = "mmexperts"


def write_model_card(model: PeftModel, folder: str | os.PathLike, repo_id: str | None = None,
                     adapter_name: str = "default", dataset: str | None = None, metrics: dict | None = None,
                     routing_plot: str | None = None, tags: list[str] | None = None) -> ModelCard:
    """Render the method's card template over the README that PEFT wrote into ``folder`` (keeping its metadata)."""
    config = model.peft_config[adapter_name]
    method = config.peft_type.value.lower()
    readme = Path(folder) / "README.md"
    card_data = ModelCard.load(readme).data if readme.exists() else ModelCard("").data
    card_data.library_name = "peft"
    card_data.tags = sorted(set(card_data.tags or []) | {LIBRARY_TAG, method, "peft", "mixture-of-experts"}
                            | set(tags or []))
    if dataset:
        card_data.datasets = [dataset]
    trainable, total = model.get_nb_trainable_parameters()
    skipped = {"peft_type", "task_type", "auto_mapping", "revision", "inference_mode", "target_modules"}
    rows = [(k, v) for k, v in sorted(config.to_dict().items()) if k not in skipped and v is not None]
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / f"{method}.md"),
        model_name=repo_id or f"{method} adapter", repo_id=repo_id or "path/to/adapter",
        base_model=config.base_model_name_or_path, dataset=dataset, metrics=metrics or {},
        routing_plot=routing_plot, config_rows=rows,
        trainable_parameters=f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        prompted_tower=getattr(config, "prompted_tower", ""), complementary_tower=getattr(config, "complementary_tower", ""),
        num_experts=getattr(config, "num_experts", ""),
    )
    card.save(readme)
    return card


def push_adapter_to_hub(model: PeftModel, repo_id: str, *, commit_message: str | None = None,
                        private: bool | None = None, token: str | None = None, revision: str | None = None,
                        create_pr: bool = False, tags: list[str] | None = None, dataset: str | None = None,
                        metrics: dict | None = None, extra_files: dict | None = None, **save_kwargs):
    """Save with PEFT, render the method's model card, and upload the folder in one commit.

    ``extra_files`` maps names in the repo to local files (e.g. a routing plot) uploaded alongside.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **{k: v for k, v in save_kwargs.items() if k != "max_shard_size"})
        routing_plot = None
        for name, path in (extra_files or {}).items():
            target = Path(folder) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(path).read_bytes())
            routing_plot = name if name.endswith(".png") and routing_plot is None else routing_plot
        adapter_name = "default" if "default" in model.peft_config else next(iter(model.peft_config))
        write_model_card(model, folder, repo_id, adapter_name, dataset, metrics, routing_plot, tags)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or "Upload mmexperts adapter")
