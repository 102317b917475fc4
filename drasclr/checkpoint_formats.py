"""Every file an encoder loads from, read by one function: `load_encoder`.

Three kinds of file, told apart by their contents:

- drasclr's training checkpoint (``checkpoint_last.pt``, or a sharded run's ``trainer.pt``):
  the header ``{"format": "drasclr-pretrain", "version"}``, ``encoder_q`` (the query
  encoder's state dict), ``encoder_config`` (``Encoder(**encoder_config)`` rebuilds it), and
  the training state (``model``, optimiser, ...: `drasclr.pretrain.checkpoints`);
- drasclr's per-epoch encoder file (``encoder_epoch_NNNN.pt``): the header, ``encoder_q`` and
  ``encoder_config`` only;
- the authors' checkpoint (docs/method.md#the-authors-checkpoints): ``{"epoch", "arch",
  "optimizer", "state_dict"}`` of a MoCo model, DDP-wrapped: keys
  ``module.encoder_q.<layer>...`` (plus ``encoder_k``, ``queue``, ``queue_ptr``). Our
  ``Encoder`` uses the same layer names, so only a key rename is needed::

      module.encoder_q.<conv>._routing_fn.fc.{weight,bias} -> <conv>.routing.{weight,bias}
      module.encoder_q.fc.{0,2}.*                          -> head.{0,2}.*

Every failure, a missing file included, is a `CheckpointError` naming the file.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor

from drasclr.nn.encoder import Encoder

CHECKPOINT_FORMAT = "drasclr-pretrain"
CHECKPOINT_VERSION = 1

#: What every drasclr checkpoint holds (``encoder_epoch_NNNN.pt`` too).
ENCODER_KEYS = ("encoder_q", "encoder_config")

#: The kinds of file `load_encoder` reads, as `read_encoder_file` names them.
TRAINING_CHECKPOINT = "training checkpoint"
ENCODER_FILE = "encoder file"
AUTHORS_CHECKPOINT = "authors' checkpoint"

_AUTHORS_PREFIXES = ("module.encoder_q.", "encoder_q.")  # DDP-wrapped, or saved unwrapped
_SHAPE_KEYS = ("conv1.weight", "conv4.weight", "head.2.weight")  # E, rep_dim, moco_dim


class CheckpointError(ValueError):
    """A file that holds no loadable encoder (missing, unreadable, of no known kind, or with
    weights that do not fit); the message starts with the file's path."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


class EncoderFile(NamedTuple):
    encoder: Encoder
    kind: str  # TRAINING_CHECKPOINT, ENCODER_FILE or AUTHORS_CHECKPOINT


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                 backend: str = "auto") -> Encoder:
    """The encoder of any checkpoint drasclr reads (see the module docstring), in eval mode
    on ``device``.

    Use ``encoder(x, loc)`` for the representation h (Yu et al. 2023, eq. 10); the projection
    head is loaded too but downstream tasks do not use it.

    Args:
        path: the file; its kind is told from its contents.
        device: where the encoder's weights go.
        backend: the Loc-CondConv backend to run it with (every backend computes the same
            function; the one saved with a drasclr checkpoint was chosen for its training).

    Raises:
        CheckpointError: naming the file, whatever the problem (a ValueError).
    """
    return read_encoder_file(path, device, backend).encoder


def read_encoder_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                      backend: str = "auto") -> EncoderFile:
    """`load_encoder`, and the kind of file it read."""
    state = read_torch_file(path, device)
    if isinstance(state, Mapping) and "format" in state:
        check_drasclr_header(path, state)
        kind = TRAINING_CHECKPOINT if "model" in state else ENCODER_FILE
        encoder = encoder_from_state(state, path, backend)
    elif isinstance(state, Mapping) and "state_dict" in state:
        kind, encoder = AUTHORS_CHECKPOINT, authors_encoder(state["state_dict"], path)
        encoder.backend = backend
    else:
        found = sorted(map(str, state))[:8] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(path, "not a drasclr training checkpoint, encoder file or authors' "
                                    f"checkpoint (found {found})")
    return EncoderFile(encoder.to(device).eval(), kind)


def read_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; CheckpointError when missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle errors: they come in many types
        raise CheckpointError(path, f"not a readable torch checkpoint ({error})") from None


def check_drasclr_header(path: str | os.PathLike, state: Mapping) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"not a drasclr checkpoint (format {state.get('format')!r}, "
                                    f"expected {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(path, f"checkpoint version {state.get('version')!r}, expected "
                                    f"{CHECKPOINT_VERSION}")


# -- drasclr's own checkpoints ---------------------------------------------------------------

def encoder_from_state(state: Mapping[str, Any], source: str | os.PathLike = "checkpoint",
                       backend: str | None = None) -> Encoder:
    """The query encoder of a loaded drasclr checkpoint (``encoder_q`` built from
    ``encoder_config``), with its saved Loc-CondConv backend unless ``backend`` is given.

    Raises:
        CheckpointError: naming ``source``: a missing key, an ``encoder_config`` with unknown
            keys or bad values, weights of the wrong keys or shapes, or non-finite weights.
    """
    missing = [key for key in ENCODER_KEYS if key not in state]
    if missing:
        raise CheckpointError(source, f"pretraining checkpoint without {missing} (found "
                                      f"{sorted(map(str, state))})")
    config = state["encoder_config"]
    if not isinstance(config, dict):
        raise CheckpointError(source, f"encoder_config is a {type(config).__name__}, not a mapping")
    known = set(inspect.signature(Encoder).parameters)
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(source, f"encoder_config has unknown key(s) {unknown}; valid keys: "
                                      f"{sorted(known)}")
    config = {**config, **({"backend": backend} if backend is not None else {})}
    try:
        encoder = Encoder(**config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(source, f"encoder_config {config}: {error}") from None
    load_checked_state(source, encoder, state["encoder_q"])
    return encoder


# -- the authors' checkpoints ----------------------------------------------------------------

def authors_encoder(model_state: Mapping[str, Tensor],
                    source: str | os.PathLike = "checkpoint") -> Encoder:
    """The query encoder (with its projection head) held by an authors' model state dict."""
    try:
        state_dict = reference_state_dict_to_encoder(model_state)
        encoder = Encoder(**encoder_config_from_state_dict(state_dict), patch_axes="zyx")
    except ValueError as error:
        raise CheckpointError(source, f"not a DrasCLR reference checkpoint: {error}") from None
    load_checked_state(source, encoder, state_dict)
    return encoder.to(state_dict["conv1.weight"].device)


def reference_state_dict_to_encoder(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``encoder_q`` entries of an authors' model state dict, renamed for ``Encoder``.

    Raises:
        ValueError: when the state dict holds no ``encoder_q`` entries.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict is a {type(state_dict).__name__}, not a mapping")
    prefix = next((p for p in _AUTHORS_PREFIXES if any(k.startswith(p) for k in state_dict)),
                  None)
    if prefix is None:
        raise ValueError(f"no query-encoder keys (expected keys starting with "
                         f"{' or '.join(repr(p) for p in _AUTHORS_PREFIXES)})")
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


# -- shared ----------------------------------------------------------------------------------

def load_checked_state(path: str | os.PathLike, encoder: Encoder,
                       state_dict: Mapping[str, Tensor]) -> None:
    """``encoder.load_state_dict(state_dict)``, or a CheckpointError naming ``path`` that lists
    the missing and unexpected keys, the wrong shapes, and tensors holding NaN or infinity (a
    diverged run's weights), instead of torch's RuntimeError."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(path, f"encoder_q is a {type(state_dict).__name__}, not a state dict")
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [f"{key} {tuple(getattr(state_dict[key], 'shape', ()))} != "
                   f"{tuple(value.shape)}" for key, value in expected.items()
                   if key in state_dict and (not isinstance(state_dict[key], Tensor)
                                             or state_dict[key].shape != value.shape)]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(path, f"encoder_q does not match the DrasCLR encoder: missing keys "
                                    f"{_summary(missing)}, unexpected keys {_summary(unexpected)}, "
                                    f"wrong shapes {_summary(wrong_shape)}")
    non_finite = [key for key, value in state_dict.items()
                  if value.is_floating_point() and not torch.isfinite(value).all()]
    if non_finite:
        raise CheckpointError(path, f"encoder weights hold NaN or infinity in "
                                    f"{_summary(non_finite)} (a diverged run?)")
    encoder.load_state_dict(state_dict)


def _summary(items: list[str], shown: int = 8) -> str:
    return f"{items[:shown]}" + (f" (+{len(items) - shown} more)" if len(items) > shown else "")
