"""The subtype head file: a linear classifier on the encoder's representation h.

Yu et al. 2023 (Section 4.3.1, emphysema subtype detection) classify 32 mm boxes with a linear
layer on the frozen representation (linear probe) or on a fine-tuned encoder; the dense maps
(Section 4.3.1, Fig. 3) slide that classifier over every lung voxel. Detection writes the
classifier in this format and ``drasclr densemap`` reads it.

A head file is a ``torch.save`` dict (readable with ``weights_only=True``)::

    {"format": "drasclr-head", "version": 1,
     "label": "centrilobular",          # the positive class
     "rep_dim": D,
     "weight": Tensor (D,), "bias": Tensor (),
     "encoder": {"config": Encoder.config,
                 "state_dict": dict | None,   # None: a linear probe on a frozen encoder,
                 "source": str},              # which checkpoint h came from
     "training_subjects": [str, ...]}   # whose boxes fitted it (absent in older files)

The probability of the label is ``sigmoid(h @ weight + bias)`` on the raw encoder output h
(``Encoder.forward``, before the projection head). A fine-tuned head carries its encoder's
weights; a linear probe does not, and its encoder comes from ``--checkpoint``. The training
subjects let ``drasclr densemap --annotations`` refuse to score a map on boxes the head was
fitted on.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from drasclr.atomic import atomic_write_bytes
from drasclr.file_format import check_header

HEAD_FORMAT = "drasclr-head"
HEAD_VERSION = 1
_KEYS = ("label", "rep_dim", "weight", "bias", "encoder")
_ENCODER_KEYS = ("config", "state_dict", "source")

ArrayLike = Union[Tensor, np.ndarray, float, list]


class SubtypeHead(nn.Module):
    """p = sigmoid(h @ weight + bias): the probability of ``label`` from h (B, rep_dim)."""

    def __init__(self, rep_dim: int, label: str = "positive") -> None:
        super().__init__()
        if not isinstance(rep_dim, int) or isinstance(rep_dim, bool) or rep_dim < 1:
            raise ValueError(f"rep_dim: expected a positive int, got {rep_dim!r}")
        self.rep_dim, self.label = rep_dim, label
        self.weight = nn.Parameter(torch.zeros(rep_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def logits(self, h: Tensor) -> Tensor:
        """(B,) logits of h (B, rep_dim), computed in h's dtype."""
        return h @ self.weight.to(h.dtype) + self.bias.to(h.dtype)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(h))

    def extra_repr(self) -> str:
        return f"rep_dim={self.rep_dim}, label={self.label!r}"


def save_head(
    path: str | os.PathLike,
    weight: ArrayLike,
    bias: ArrayLike,
    *,
    label: str,
    encoder: Union[nn.Module, dict[str, Any]],
    include_encoder_weights: bool = False,
    source: str = "",
    training_subjects: Optional[Sequence[str]] = None,
) -> Path:
    """Write a head file atomically.

    Args:
        weight: (D,) or (1, D) (e.g. ``LogisticRegression.coef_`` or ``nn.Linear(D, 1).weight``).
        bias: a scalar, () or (1,) (``intercept_``, ``nn.Linear.bias``).
        label: the positive class, e.g. ``"centrilobular"``.
        encoder: the ``Encoder`` h comes from, or its ``config`` dict.
        include_encoder_weights: save the encoder's state dict too (fine-tuning); needs an
            ``Encoder`` module. Leave False for a linear probe on a frozen checkpoint.
        source: where the encoder came from (a checkpoint path, "fine-tuned from ...").
        training_subjects: the subjects whose boxes fitted the head (and the fine-tuned
            encoder); None records nothing, and scoring maps on boxes then only warns.
    """
    weight_t = torch.as_tensor(np.asarray(weight.detach().cpu() if isinstance(weight, Tensor)
                                          else weight, dtype=np.float32)).reshape(-1)
    bias_t = torch.as_tensor(np.asarray(bias.detach().cpu() if isinstance(bias, Tensor) else bias,
                                        dtype=np.float32)).reshape(-1)
    if bias_t.numel() != 1:
        raise ValueError(f"bias: expected one value, got shape {tuple(bias_t.shape)}")
    if isinstance(encoder, nn.Module):
        config = dict(encoder.config)
        state_dict = ({k: v.detach().cpu() for k, v in encoder.state_dict().items()}
                      if include_encoder_weights else None)
    elif isinstance(encoder, dict):
        if include_encoder_weights:
            raise ValueError("include_encoder_weights needs the Encoder module, not its config")
        config, state_dict = dict(encoder), None
    else:
        raise ValueError(f"encoder: expected an Encoder or its config dict, got {type(encoder).__name__}")
    rep_dim = config.get("rep_dim")
    if weight_t.shape != (rep_dim,):
        raise ValueError(f"weight: expected {rep_dim} values (the encoder's rep_dim), "
                         f"got {weight_t.numel()}")
    payload = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "label": str(label),
               "rep_dim": int(rep_dim), "weight": weight_t.clone(), "bias": bias_t[0].clone(),
               "encoder": {"config": config, "state_dict": state_dict, "source": str(source)}}
    if training_subjects is not None:
        payload["training_subjects"] = sorted({str(s) for s in training_subjects})
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_head(path: str | os.PathLike, map_location: str | torch.device = "cpu"
              ) -> tuple[SubtypeHead, Optional[nn.Module], dict[str, Any]]:
    """Read a head file.

    Returns:
        (head, encoder, metadata): the ``SubtypeHead`` in eval mode; the fine-tuned
        ``Encoder`` (eval mode) when the file holds its weights, else None; metadata with
        ``label``, ``rep_dim``, ``encoder_config``, ``encoder_source``, ``path`` and
        ``training_subjects`` (a tuple, or None when the file does not record them).
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file: not a head file, another version, missing keys, a weight
            whose size is not the encoder's rep_dim, encoder weights that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such head file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip and unpickling errors of many types: not a head file
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        raise ValueError(f"{path}: not a drasclr head file (unreadable by torch.load: "
                         f"{type(error).__name__}{': ' + reason if reason else ''})") from None
    check_header(path, state, HEAD_FORMAT, HEAD_VERSION, "head file")
    missing = [key for key in _KEYS if key not in state]
    encoder_info = state.get("encoder")
    if isinstance(encoder_info, dict):
        missing += [f"encoder.{key}" for key in _ENCODER_KEYS if key not in encoder_info]
    elif "encoder" in state:
        missing.append("encoder.config")
    if missing:
        raise ValueError(f"{path}: head file is missing keys {missing}")
    weight, bias, config = state["weight"], state["bias"], encoder_info["config"]
    rep_dim = config.get("rep_dim") if isinstance(config, dict) else None
    if not isinstance(weight, Tensor) or weight.shape != (rep_dim,) or state["rep_dim"] != rep_dim:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{path}: head weight of shape {shape} does not match the encoder's "
                         f"rep_dim {rep_dim} (header says {state['rep_dim']})")
    if not isinstance(bias, Tensor) or bias.numel() != 1:
        raise ValueError(f"{path}: head bias must be one value")
    head = SubtypeHead(int(rep_dim), str(state["label"]))
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float().reshape(()))
    encoder = None
    if encoder_info["state_dict"] is not None:
        from drasclr.nn import Encoder

        try:
            encoder = Encoder(**config)
            encoder.load_state_dict(encoder_info["state_dict"])
        except (TypeError, RuntimeError, ValueError) as error:
            raise ValueError(f"{path}: the head's encoder weights do not fit its config "
                             f"({str(error).splitlines()[0]})") from None
        encoder = encoder.to(map_location).eval()
    metadata = {"label": head.label, "rep_dim": head.rep_dim, "encoder_config": dict(config),
                "encoder_source": str(encoder_info["source"]), "path": str(path),
                "training_subjects": training_subjects_of(state, path)}
    return head.eval(), encoder, metadata


def training_subjects_of(state: dict, path: Path) -> Optional[tuple[str, ...]]:
    """The head file's record of its training subjects; None when it has none."""
    subjects = state.get("training_subjects")
    if subjects is None:
        return None
    if not isinstance(subjects, (list, tuple)) or not all(isinstance(s, str) for s in subjects):
        raise ValueError(f"{path}: training_subjects must be a list of subject ids")
    return tuple(subjects)


def check_head_matches(head: SubtypeHead, encoder: nn.Module, head_path: str | os.PathLike,
                       encoder_path: str | os.PathLike) -> None:
    """Raise a ValueError naming both files when the head's rep_dim is not the encoder's."""
    rep_dim = getattr(encoder, "rep_dim", None)
    if rep_dim != head.rep_dim:
        raise ValueError(f"{head_path}: head expects representations of size {head.rep_dim}, "
                         f"but the encoder of {encoder_path} produces {rep_dim}")


def head_and_encoder(head_path: str | os.PathLike, checkpoint: Optional[str | os.PathLike] = None,
                     device: str | torch.device = "cpu"
                     ) -> tuple[SubtypeHead, nn.Module, dict[str, Any]]:
    """The head and the encoder its h comes from: the head's own (fine-tuned) encoder when it
    holds one, else the ``checkpoint``'s (linear probe), checked to match.

    Raises:
        ValueError: a linear-probe head without ``checkpoint``, or rep_dims that differ.
    """
    head, encoder, metadata = load_head(head_path, map_location=device)
    if encoder is not None and checkpoint is not None:
        warnings.warn(f"{head_path} carries its fine-tuned encoder; {checkpoint} is not used",
                      stacklevel=2)
    if encoder is None:
        if checkpoint is None:
            raise ValueError(f"{head_path}: this head is a linear probe without encoder weights; "
                             "give the encoder checkpoint (--checkpoint)")
        from drasclr.checkpoint_formats import load_encoder

        encoder = load_encoder(checkpoint, device)
        check_head_matches(head, encoder, head_path, checkpoint)
        metadata["encoder_source"] = str(checkpoint)
    return head.to(device), encoder.to(device).eval(), metadata
