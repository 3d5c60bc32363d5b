"""The classification head: the final layer(s) that map features to class logits.

The adaptive merge gives the head its own coefficients beta: each site model's head is applied to
the features of the alpha-merged body (``head_probabilities``), and beta follows how uncertain each
head is there. ``detect_head`` finds the head from the model card or from the network itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import UserInputError
from .models import SiteModel
from .probe import Probe, batched_forward, softmax_on_cpu


@dataclass(frozen=True)
class Head:
    """The final layer(s) that map features to class logits: one module and its state-dict keys.

    Attributes:
        module_name: the module holding the head ("" when the model card names several).
        keys: the head's state-dict keys.
    """

    module_name: str
    keys: frozenset[str]


def _out_channels(module: torch.nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
        return None
    type_name = getattr(module, "original_name", type(module).__name__)
    return int(weight.shape[1] if "Transpose" in type_name else weight.shape[0])


def detect_head(network: torch.nn.Module, num_classes: int, names: tuple[str, ...] | None = None) -> Head | None:
    """The head named in the model card, or the smallest module holding the trailing layers whose
    output channels equal the number of classes.

    Args:
        network: a site model's network.
        num_classes: C, the number of output classes.
        names: the modules the model card names as the head, if any.

    Returns:
        The head, or None when it cannot be told apart from the body.
    """
    state_keys = list(network.state_dict())
    modules = dict(network.named_modules())
    if names:
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise UserInputError(f"model card 'head' names modules that do not exist: {', '.join(unknown)}")
        prefix = names[0] if len(names) == 1 else ""
        keys = frozenset(k for k in state_keys if any(k.startswith(n + ".") for n in names))
        return Head(prefix, keys) if keys else None
    layers = [(name, out) for name, m in modules.items() if (out := _out_channels(m)) is not None]
    trailing = []
    for name, out in reversed(layers):
        if out != num_classes:
            break
        trailing.append(name)
    if not trailing:
        return None
    parts = [name.split(".") for name in trailing]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    prefix = ".".join(common)
    if len(trailing) == 1:
        prefix = trailing[0]
    if not prefix:
        return None
    keys = frozenset(k for k in state_keys if k.startswith(prefix + "."))
    return Head(prefix, keys) if keys and len(keys) < len(state_keys) else None


def head_probabilities(body_network: torch.nn.Module, head: Head, models: Sequence[SiteModel], probe: Probe, device: torch.device,
                       batch_size: int = 2) -> list[torch.Tensor]:
    """Each site model's head applied to the merged body's features on the probe.

    The merged body runs once; a forward pre-hook captures the head's input and every head is
    applied to it with its own parameters.

    Args:
        body_network: the network with the merged body (its own head is not used).
        head: the head, as ``detect_head`` found it.
        models: the K site models whose heads are applied.
        probe: the probe.
        device: where the networks run.
        batch_size: patches per forward pass.

    Returns:
        K tensors of (P, C, X, Y, Z) float32 probabilities on the CPU, in the order of ``models``.
    """
    from torch.func import functional_call

    network = body_network.to(device).eval()
    head_module = dict(network.named_modules())[head.module_name]
    captured: list[tuple] = []
    handle = head_module.register_forward_pre_hook(lambda module, args: captured.append(args))
    start_length = len(head.module_name) + 1
    head_states = [{k[start_length:]: v.to(device) for k, v in m.state_dict().items() if k in head.keys} for m in models]

    def every_head(_body_logits: torch.Tensor) -> list[torch.Tensor]:
        outputs = [softmax_on_cpu(functional_call(head_module, state, captured[0])) for state in head_states]
        captured.clear()  # after the heads: calling the head module fires the hook too
        return outputs

    try:
        per_batch = batched_forward(network, probe.patches, device, batch_size, every_head)
    finally:
        handle.remove()
    return [torch.cat([batch[k] for batch in per_batch]) for k in range(len(models))]
