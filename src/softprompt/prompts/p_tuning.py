"""P-tuning (Liu et al. 2021): virtual tokens produced by a small prompt encoder.

Trainable input vectors ``[n, hidden]`` go through an encoder, a bidirectional LSTM followed by a
two-layer MLP (``lstm``) or an MLP alone (``mlp``), and the encoder's output is added to them. The
encoder's last layer starts at zero, so the virtual tokens start exactly at their initialization
(e.g. a text's embeddings) and the encoder learns a correction that couples the tokens. At save the
virtual tokens are materialized (``prompt_embeddings``, the same layout as prompt tuning) for
inference; the encoder is saved too so training can resume.
"""
from __future__ import annotations

import torch
from torch import nn

from softprompt.errors import SoftPromptError
from softprompt.prompts.soft_prompt import Materialized

ENCODERS = ("lstm", "mlp")


class _LSTMEncoder(nn.Module):
    def __init__(self, hidden: int, width: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(hidden, width, num_layers=layers, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.lstm(x.unsqueeze(0))[0][0])


class _MLPEncoder(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PTuning(Materialized):
    kind = "p-tuning"

    def __init__(self, n_virtual: int, hidden_size: int, encoder: str = "lstm", encoder_hidden: int | None = None,
                 encoder_layers: int = 2, init: torch.Tensor | None = None):
        super().__init__(n_virtual, hidden_size)
        if encoder not in ENCODERS:
            raise SoftPromptError(f"unknown p-tuning encoder {encoder!r} (choose from {', '.join(ENCODERS)})")
        self.encoder_type, self.encoder_layers = encoder, encoder_layers
        self.encoder_hidden = encoder_hidden or (hidden_size // 2 if encoder == "lstm" else hidden_size)
        weight = torch.zeros(n_virtual, hidden_size) if init is None else init.detach().clone().float()
        if weight.shape != (n_virtual, hidden_size):
            raise ValueError(f"init shape {tuple(weight.shape)} != ({n_virtual}, {hidden_size})")
        self.embeddings = nn.Parameter(weight)
        self.encoder = (_LSTMEncoder(hidden_size, self.encoder_hidden, encoder_layers) if encoder == "lstm"
                        else _MLPEncoder(hidden_size, self.encoder_hidden))
        last = self.encoder.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @classmethod
    def create(cls, n_virtual: int, base, init: torch.Tensor, options: dict | None = None) -> "PTuning":
        options = dict(options or {})
        unknown = options.keys() - {"encoder", "encoder_hidden", "encoder_layers"}
        if unknown:
            raise SoftPromptError(f"unknown p-tuning option(s): {', '.join(sorted(unknown))}")
        return cls(n_virtual, base.hidden_size, init=init, **options)

    def generate(self) -> torch.Tensor:
        return self.embeddings + self.encoder(self.embeddings)

    def vectors(self) -> torch.Tensor:
        return self.table()

    def config(self) -> dict:
        return {"n_virtual": self.n_virtual, "encoder": self.encoder_type, "encoder_hidden": self.encoder_hidden,
                "encoder_layers": self.encoder_layers}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeddings": self.materialize().cpu().contiguous()}
        out.update({f"encoder_state.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {k[len("encoder_state."):]: v for k, v in tensors.items() if k.startswith("encoder_state.")}
        self.load_state_dict(own, strict=True)
        self.materialized = tensors["prompt_embeddings"].float().clone()
        self.train(False)
