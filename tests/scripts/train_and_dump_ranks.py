"""Run the recipe under a launcher and dump every rank's adapter weights before and after training."""

import json
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from mmexperts.training import Trainer, parse_config


def dump(trainer: Trainer, name: str) -> None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(Path(trainer.config.output_dir) / name))


if __name__ == "__main__":
    trainer = Trainer(parse_config())
    trainer.setup()
    rank = trainer.accelerator.process_index
    Path(trainer.config.output_dir).mkdir(parents=True, exist_ok=True)
    dump(trainer, f"rank_{rank}_initial.safetensors")
    trainer.train()
    dump(trainer, f"rank_{rank}.safetensors")
    if trainer.accelerator.is_main_process:
        world = {"num_processes": trainer.accelerator.num_processes}
        (Path(trainer.config.output_dir) / "world.json").write_text(json.dumps(world))
