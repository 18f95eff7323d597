"""Hidden representations of a model, read by layer name with forward hooks."""

import torch
from torch import nn


@torch.inference_mode()
def representations(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> dict[str, torch.Tensor]:
    """Outputs of each of ``model.representation_layers`` for inputs ``x``, in eval mode, on CPU.

    Hooks read any named submodule, so models need no attributes stashed during ``forward``.
    """
    names: tuple[str, ...] = getattr(model, "representation_layers", ())
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, output, name=name: captured[name].append(output.detach().cpu())
        )
        for name in names
    ]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in captured.items()}
