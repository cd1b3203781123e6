"""A MoPE PeftModel trains with transformers' own Trainer."""

from __future__ import annotations

import peft
import torch
from transformers import Trainer, TrainingArguments

from mmexperts import MoPEConfig

from conftest import make_batch, make_classifier


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["labels"])

    def __getitem__(self, index: int) -> dict:
        return {key: value[index] for key, value in self.batch.items()}


def test_transformers_trainer_updates_only_the_adapter(tmp_path):
    model = peft.get_peft_model(make_classifier(), MoPEConfig(init_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, report_to=[], remove_unused_columns=False, use_cpu=True,
                             save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(make_batch(batch_size=16, seed=3)))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("mope_" in n or "classifier" in n for n in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = peft.PeftModel.from_pretrained(make_classifier(), tmp_path / "adapter").eval()
    model.eval()
    batch = make_batch()
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
