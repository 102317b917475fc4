"""Encoders from checkpoints written by the authors' DrasCLR code (SPEC section 10).

The reference saves ``{"epoch", "arch", "optimizer", "state_dict"}`` of a MoCo model wrapped in
DistributedDataParallel: keys ``module.encoder_q.<layer>...`` (plus ``encoder_k``, ``queue``,
``queue_ptr``). Feature extraction needs only ``encoder_q``; our ``Encoder`` uses the same
layer names, so conversion is a key rename:

    module.encoder_q.<conv>._routing_fn.fc.{weight,bias} -> <conv>.routing.{weight,bias}
    module.encoder_q.fc.{0,2}.*                          -> head.{0,2}.*

Our own checkpoints need none of this: ``Encoder(**config).load_state_dict(state_dict)``.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor

from drasclr.nn.encoder import Encoder

_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.")  # DDP-wrapped, or saved unwrapped
_SHAPE_KEYS = ("conv1.weight", "conv4.weight", "head.2.weight")  # E, rep_dim, moco_dim


def reference_state_dict_to_encoder(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``encoder_q`` entries of an authors' model state dict, renamed for ``Encoder``.

    Raises:
        ValueError: when the state dict holds no ``encoder_q`` entries.
    """
    prefix = next((p for p in _ENCODER_PREFIXES if any(k.startswith(p) for k in state_dict)),
                  None)
    if prefix is None:
        raise ValueError(f"no query-encoder keys (expected keys starting with "
                         f"{' or '.join(repr(p) for p in _ENCODER_PREFIXES)})")
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # encoder_k, queue, queue_ptr: training state only
        name = key[len(prefix):].replace("._routing_fn.fc.", ".routing.")
        if name.startswith("fc."):
            name = "head." + name[len("fc."):]
        converted[name] = value
    return converted


def encoder_config_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Encoder sizes read from the shapes of a converted state dict."""
    missing = [key for key in _SHAPE_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"missing keys {missing}")
    return dict(num_experts=state_dict["conv1.weight"].shape[0],
                rep_dim=state_dict["conv4.weight"].shape[1],
                moco_dim=state_dict["head.2.weight"].shape[0])


def load_reference_checkpoint(path: str | os.PathLike, map_location="cpu") -> Encoder:
    """The query encoder (with its projection head) of an authors' checkpoint, in eval mode.

    Args:
        path: a ``torch.save`` file written by the reference training script.
        map_location: as for ``torch.load``; the encoder ends up where its weights are.

    Raises:
        ValueError: naming the file and what is missing or wrong when it is not such a
            checkpoint.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle/zip errors come in many types
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = (sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping)
                 else type(checkpoint).__name__)
        raise ValueError(f"{path}: not a DrasCLR reference checkpoint: missing key "
                         f"'state_dict' (found {found})")
    try:
        state_dict = reference_state_dict_to_encoder(checkpoint["state_dict"])
        encoder = Encoder(**encoder_config_from_state_dict(state_dict))
    except ValueError as error:
        raise ValueError(f"{path}: not a DrasCLR reference checkpoint: {error}") from None
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [f"{key} {tuple(state_dict[key].shape)} != {tuple(value.shape)}"
                   for key, value in expected.items()
                   if key in state_dict and state_dict[key].shape != value.shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path}: encoder_q does not match the DrasCLR encoder: "
                         f"missing keys {_summary(missing)}, unexpected keys "
                         f"{_summary(unexpected)}, wrong shapes {_summary(wrong_shape)}")
    encoder.load_state_dict(state_dict)
    return encoder.to(state_dict["conv1.weight"].device).eval()


def _summary(items: list[str], shown: int = 8) -> str:
    return f"{items[:shown]}" + (f" (+{len(items) - shown} more)" if len(items) > shown else "")
