"""Steering in torch: add ``multiplier * vector[L]`` to the output of decoder block L.

The torch reference for the native engine. Positions are columns of the (padded) input:
columns ``>= from_position`` are steered, earlier ones are not, per row when given a tensor.
During incremental decoding with a KV cache, the new columns continue after the cached
ones, so generated tokens (which follow the instruction end) are always steered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from caa_local.torch.hf import decoder_layers, input_device
from caa_local.core.layers import check_steerable
from caa_local.core.vector import ControlVector

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _past_length(kwargs: dict[str, Any], layer: int) -> int:
    """Columns already in block ``layer``'s KV cache (called before the block updates it)."""
    if kwargs.get("use_cache") is False:
        return 0
    for key in _CACHE_KWARGS:
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            try:
                return int(cache.get_seq_length(layer))
            except (TypeError, ValueError, IndexError):
                return int(cache.get_seq_length())
    return 0


def _row_starts(from_position: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
    if from_position is None:
        return None
    starts = torch.as_tensor(from_position, dtype=torch.long)
    if starts.ndim > 1:
        raise ValueError(f"from_position: expected an int or one per row, got shape {tuple(starts.shape)}")
    return starts.reshape(-1)


@contextlib.contextmanager
def steer(
    model: Any,
    vector: ControlVector,
    multiplier: float,
    layers: Sequence[int],
    from_position: int | Sequence[int] | torch.Tensor | None = None,
) -> Iterator[None]:
    """Within the block, forward passes add ``multiplier * vector[L]`` after block L for each L.

    ``from_position``: first steered column (None = every column), an int for all rows or one
    value per row of a padded batch.
    """
    blocks = decoder_layers(model)
    n_layer = len(blocks)
    for layer in layers:
        check_steerable(layer, n_layer)
    vector.check_fits(int(model.config.hidden_size), n_layer, "steering vector")
    chosen = vector.only(list(layers))
    starts = _row_starts(from_position)
    handles = []

    for layer in chosen.layers:
        delta_cpu = torch.from_numpy(chosen.directions[layer].copy()) * float(multiplier)
        state: dict[str, Any] = {"past": 0, "delta": None}

        def pre_hook(_module: Any, _args: Any, kwargs: dict[str, Any], layer: int = layer,
                     state: dict[str, Any] = state) -> None:
            state["past"] = _past_length(kwargs, layer)

        def hook(_module: Any, _args: Any, output: Any, state: dict[str, Any] = state,
                 delta_cpu: torch.Tensor = delta_cpu) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            delta = state["delta"]
            if delta is None or delta.device != hidden.device or delta.dtype != hidden.dtype:
                delta = state["delta"] = delta_cpu.to(device=hidden.device, dtype=hidden.dtype)
            if starts is None:
                steered = hidden + delta
            else:
                cols = torch.arange(hidden.shape[1], device=hidden.device) + state["past"]
                mask = cols[None, :] >= starts.to(hidden.device)[:, None]  # (rows or 1, seq)
                steered = hidden + mask.unsqueeze(-1).to(hidden.dtype) * delta
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        handles.append(blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True))
        # prepend: observers (transformers keeps its own hooks for output_hidden_states) see
        # the steered output, as the next block does.
        handles.append(blocks[layer].register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_outputs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Raw outputs of every decoder block: (n_layer, batch, seq, n_embd), on the CPU.

    Read by hooks after any steering hooks, so steered blocks show their steered output.
    """
    blocks = decoder_layers(model)
    outputs: list[torch.Tensor | None] = [None] * len(blocks)

    def make_hook(index: int):  # noqa: ANN202
        def hook(_module: Any, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden.detach().float().cpu()

        return hook

    handles = [block.register_forward_hook(make_hook(i)) for i, block in enumerate(blocks)]
    device = input_device(model)
    try:
        with torch.inference_mode():
            model(
                input_ids=input_ids.to(device),
                attention_mask=None if attention_mask is None else attention_mask.to(device),
                use_cache=False,
                **kwargs,
            )
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([out for out in outputs if out is not None])
