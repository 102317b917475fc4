"""Encoders from checkpoints written by the authors' DrasCLR code
(docs/method.md#the-authors-checkpoints).

The reference saves ``{"epoch", "arch", "optimizer", "state_dict"}`` of a MoCo model wrapped in
DistributedDataParallel: keys ``module.encoder_q.<layer>...`` (plus ``encoder_k``, ``queue``,
``queue_ptr``). Feature extraction needs only ``encoder_q``; our ``Encoder`` uses the same
layer names, so conversion is a key rename:

    module.encoder_q.<conv>._routing_fn.fc.{weight,bias} -> <conv>.routing.{weight,bias}
    module.encoder_q.fc.{0,2}.*                          -> head.{0,2}.*

The authors cut their patches from SimpleITK arrays, (z, y, x) where drasclr's are (x, y, z), so
their encoder is built with ``patch_axes="zyx"`` (docs/method.md#patch-axis-order).

Our own checkpoints need none of this: ``Encoder(**config).load_state_dict(state_dict)``.
:func:`load_any_encoder` reads either kind, and our per-epoch encoder files, telling which.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from drasclr.nn.encoder import Encoder

_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.")  # DDP-wrapped, or saved unwrapped
_SHAPE_KEYS = ("conv1.weight", "conv4.weight", "head.2.weight")  # E, rep_dim, moco_dim

#: The kinds of file :func:`load_any_encoder` reads, as it names them.
TRAINING_CHECKPOINT = "training checkpoint"  # drasclr's checkpoint_last.pt
ENCODER_FILE = "encoder file"  # drasclr's encoder_epoch_NNNN.pt
AUTHORS_CHECKPOINT = "authors' checkpoint"  # the reference implementation's checkpoint


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
    checkpoint = _read_torch_file(path, map_location)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = (sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping)
                 else type(checkpoint).__name__)
        raise ValueError(f"{path}: not a DrasCLR reference checkpoint: missing key "
                         f"'state_dict' (found {found})")
    return _reference_encoder(path, checkpoint["state_dict"])


def load_any_encoder(path: str | os.PathLike, map_location="cpu",
                     backend: str = "auto") -> tuple[Encoder, str]:
    """The encoder of any checkpoint drasclr reads, in eval mode, and the kind of file it was.

    The kind is told from the file's contents, read once: drasclr's training checkpoint
    (``checkpoint_last.pt``: header and ``model``), its per-epoch encoder file
    (``encoder_epoch_NNNN.pt``: header, no ``model``), or the authors' checkpoint
    (``state_dict`` with ``module.encoder_q.*`` keys).

    Args:
        path: the file.
        map_location: as for ``torch.load``.
        backend: the Loc-CondConv backend to run drasclr's encoders with; the one saved with
            them was chosen for training, and every backend computes the same function.

    Returns:
        (encoder, kind): kind is :data:`TRAINING_CHECKPOINT`, :data:`ENCODER_FILE` or
        :data:`AUTHORS_CHECKPOINT`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when it is none of these.
    """
    from drasclr.file_format import check_header
    from drasclr.pretrain.checkpoints import (
        CHECKPOINT_FORMAT, CHECKPOINT_VERSION, encoder_from_state,
    )

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state = _read_torch_file(path, map_location)
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        check_header(path, state, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "pretraining checkpoint")
        kind = TRAINING_CHECKPOINT if "model" in state else ENCODER_FILE
        encoder = encoder_from_state(state, backend=backend, source=path)
    elif isinstance(state, Mapping) and "state_dict" in state:
        kind, encoder = AUTHORS_CHECKPOINT, _reference_encoder(path, state["state_dict"])
    else:
        found = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{path}: not a drasclr training checkpoint, encoder file or authors' "
                         f"checkpoint (found {found})")
    return encoder.eval(), kind


def _read_torch_file(path: str | os.PathLike, map_location) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle/zip errors come in many types
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from None


def _reference_encoder(path: str | os.PathLike, model_state: Mapping[str, Tensor]) -> Encoder:
    """The encoder of an authors' model state dict; ValueError naming ``path`` when it does
    not hold one of the DrasCLR encoder's shape."""
    try:
        state_dict = reference_state_dict_to_encoder(model_state)
        encoder = Encoder(**encoder_config_from_state_dict(state_dict), patch_axes="zyx")
    except ValueError as error:
        raise ValueError(f"{path}: not a DrasCLR reference checkpoint: {error}") from None
    load_checked_state(path, encoder, state_dict)
    return encoder.to(state_dict["conv1.weight"].device).eval()


def load_checked_state(path: str | os.PathLike, encoder: Encoder,
                       state_dict: Mapping[str, Tensor]) -> None:
    """``encoder.load_state_dict(state_dict)``, or a ValueError naming ``path`` that lists the
    missing and unexpected keys, the wrong shapes, and tensors holding NaN or infinity (a
    diverged run's weights), instead of torch's RuntimeError."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: encoder_q is a {type(state_dict).__name__}, not a state dict")
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [f"{key} {tuple(getattr(state_dict[key], 'shape', ()))} != "
                   f"{tuple(value.shape)}" for key, value in expected.items()
                   if key in state_dict and (not isinstance(state_dict[key], Tensor)
                                             or state_dict[key].shape != value.shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"{path}: encoder_q does not match the DrasCLR encoder: "
                         f"missing keys {_summary(missing)}, unexpected keys "
                         f"{_summary(unexpected)}, wrong shapes {_summary(wrong_shape)}")
    non_finite = [key for key, value in state_dict.items()
                  if value.is_floating_point() and not torch.isfinite(value).all()]
    if non_finite:
        raise ValueError(f"{path}: encoder weights hold NaN or infinity in "
                         f"{_summary(non_finite)} (a diverged run?)")
    encoder.load_state_dict(state_dict)


def _summary(items: list[str], shown: int = 8) -> str:
    return f"{items[:shown]}" + (f" (+{len(items) - shown} more)" if len(items) > shown else "")
