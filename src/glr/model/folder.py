"""Model folders: `models/<backbone>/<phase>/` = weights (safetensors) + config.json.

Every stage that reads or writes a model goes through these: `init` and `train` write them,
`train` (the next phase) and `extract` read them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glr import files
from glr.model.build import model_from_config

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: torch.nn.Module, folder: Path, config: dict) -> None:
    """Weights (safetensors) and a JSON config, written atomically into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with files.atomic(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_model(folder: Path) -> tuple[torch.nn.Module, dict]:
    """A model folder back as (model, config)."""
    config = json.loads((Path(folder) / CONFIG).read_text())
    model = model_from_config(config["model"])
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return model, config


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
