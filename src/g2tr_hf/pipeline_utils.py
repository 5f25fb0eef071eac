"""The call conventions of diffusers pipelines, shared by the G2TR image-generation pipelines.

Users of diffusers reach for the same handful of options in every text-to-image or editing pipeline:
`num_images_per_prompt`, `latents=` (their own initial noise), `callback_on_step_end` with
`callback_on_step_end_tensor_inputs`, `output_type` ("pil", "np", "pt", "latent"), `return_dict` and
`enable_model_cpu_offload()`. This module holds their checks and their model-independent parts, so that every G2TR
pipeline (BAGEL's editing / text-to-image pipeline, and InternVL-U's with the same call shape) accepts and refuses
them alike. Latents are always handled as a list with one tensor per generated image: the images of one call may
differ in size, so they are never stacked implicitly.

This module travels to the Hub with the pipelines: it imports only torch, numpy, PIL, transformers' logging, our
`image_utils` and the standard library (accelerate lazily, when offloading is switched on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .image_utils import load_image_source


logger = logging.get_logger(__name__)

__all__ = [
    "check_input_images",
    "PerCallPipelineMixin",
    "OUTPUT_TYPES",
    "ModelCpuOffloadMixin",
    "check_callback",
    "check_latents",
    "check_num_images_per_prompt",
    "check_return_dict",
    "check_output_type",
    "convert_images",
    "expand_generators",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_output_type(output_type: Any) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
    return output_type


def check_return_dict(return_dict: Any) -> bool:
    if not isinstance(return_dict, bool):
        raise ValueError(f"`return_dict` must be a bool (False returns a tuple), got {return_dict!r}.")
    return return_dict


def check_num_images_per_prompt(num_images_per_prompt: Any) -> int:
    value = num_images_per_prompt
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {value!r}.")
    return value


def expand_generators(
    generator: Any, num_prompts: int, num_images_per_prompt: int
) -> list[torch.Generator | None]:
    """One generator (or None) per generated image, images ordered prompt by prompt.

    Accepted, as in diffusers: None; one `torch.Generator` shared by all images (each draws its noise from it in
    turn); a list with one generator per image (`num_prompts * num_images_per_prompt`). Also a list with one per
    prompt, shared by that prompt's images, so that a call with several prompts equals the single-prompt calls.
    """
    total = num_prompts * num_images_per_prompt
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * total
    if isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) == total:
            return list(generator)
        if len(generator) == num_prompts:
            return [g for g in generator for _ in range(num_images_per_prompt)]
    length = f" of length {len(generator)}" if isinstance(generator, (list, tuple)) else ""
    raise ValueError(
        f"`generator` must be None, a torch.Generator, or a list of torch.Generator with one per image ({total}) or "
        f"one per prompt ({num_prompts}), got {type(generator).__name__}{length}."
    )


def check_latents(latents: Any, shapes: Sequence[tuple[int, ...]], name: str = "latents") -> list[torch.Tensor] | None:
    """Validate user latents against the expected shape of every image's latent.

    Args:
        latents: None; a list with one tensor per image; one tensor stacking them (all shapes equal); or, for a single
            image, its tensor alone.
        shapes: the expected shape of each image's latent, in image order.
    Returns:
        None, or one tensor per image.
    """
    if latents is None:
        return None
    expected = [tuple(shape) for shape in shapes]
    described = ", ".join(str(list(shape)) for shape in dict.fromkeys(expected))
    if isinstance(latents, torch.Tensor):
        if len(expected) == 1 and tuple(latents.shape) == expected[0]:
            return [latents]
        if len(set(expected)) == 1 and tuple(latents.shape) == (len(expected), *expected[0]):
            return list(latents.unbind(0))
        stacked = f" or [{len(expected)}, ...] stacked" if len(set(expected)) == 1 else " (pass a list: they differ)"
        raise ValueError(
            f"`{name}` must hold one latent per generated image ({len(expected)}) of shape {described}{stacked}; "
            f"got a tensor of shape {list(latents.shape)}."
        )
    if isinstance(latents, (list, tuple)) and all(isinstance(item, torch.Tensor) for item in latents):
        got = [tuple(item.shape) for item in latents]
        if got == expected:
            return list(latents)
        raise ValueError(
            f"`{name}` must hold one latent per generated image of shapes {[list(s) for s in expected]}, got "
            f"{[list(s) for s in got]}."
        )
    raise ValueError(f"`{name}` must be a tensor or a list of tensors, got {type(latents).__name__}.")


def check_callback(
    callback_on_step_end: Any, tensor_inputs: Any, allowed: Sequence[str]
) -> tuple[Callable | None, list[str]]:
    """`callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict` and the names it receives."""
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(
            "`callback_on_step_end` must be callable as fn(pipe, step, timestep, callback_kwargs) -> dict, got "
            f"{type(callback_on_step_end).__name__}."
        )
    names = [tensor_inputs] if isinstance(tensor_inputs, str) else tensor_inputs
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in allowed for n in names):
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` must name some of {list(allowed)}, got {tensor_inputs!r}."
        )
    return callback_on_step_end, list(names)


def convert_images(pixels: list[torch.Tensor], output_type: str) -> list:
    """Float images [3, H, W] in [0, 1] -> the `output_type` (one entry per image, never stacked):
    "pt" the tensors, "np" float32 arrays [H, W, 3], "pil" RGB images (x * 255 truncated to uint8, as upstream)."""
    if output_type == "pt":
        return list(pixels)
    if output_type == "np":
        return [image.permute(1, 2, 0).float().numpy() for image in pixels]
    return [PIL.Image.fromarray((image * 255).to(torch.uint8).permute(1, 2, 0).numpy()) for image in pixels]




def _is_image(value: object) -> bool:
    if isinstance(value, PIL.Image.Image):
        return True
    return isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim in (2, 3)


def check_input_images(entry: Any) -> list[Any]:
    """One prompt's `image` entry -> its list of input images: None -> [] (text-to-image), one image or a list of
    them; paths and URLs are loaded (as the processors do). Anything else is a `ValueError` naming `image`."""
    if entry is None:
        return []
    images = list(entry) if isinstance(entry, (list, tuple)) else [entry]
    if not images:
        raise ValueError(
            "`image`: an edit needs at least one input image (got an empty list); pass None for text-to-image."
        )
    images = [load_image_source(item, "image") if isinstance(item, str) else item for item in images]
    for item in images:
        if not _is_image(item):
            shape = f" of shape {tuple(item.shape)}" if isinstance(item, (np.ndarray, torch.Tensor)) else ""
            raise ValueError(
                "`image` must hold PIL images, numpy arrays (H, W[, C]), tensors (C, H, W), paths or URLs, got "
                f"{type(item).__name__}{shape}."
            )
    return images

class PerCallPipelineMixin:
    """transformers `Pipeline` plumbing shared by the image-generation pipelines: every setting is a keyword argument
    of `__call__` (the constructor takes none), denoising shows a diffusers-style tqdm progress bar and stops early
    when a callback sets `_interrupt`."""

    _progress_bar_config: dict[str, Any]
    _interrupt: bool = False

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from `callback_on_step_end`) to stop denoising after the current step;
        the images are decoded from the latents reached so far (diffusers' convention)."""
        return self._interrupt

    def _sanitize_parameters(self, **kwargs):
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} takes its settings per call, not at construction: got {sorted(kwargs)}."
            )
        return {}, {}, {}

    def progress_bar(self, total: int, disable: bool = False):
        """A tqdm bar over `total` steps (`set_progress_bar_config` sets its options)."""
        config = dict(getattr(self, "_progress_bar_config", {}))
        config["disable"] = disable or config.get("disable", False)
        return tqdm(total=total, **config)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options of the progress bars (tqdm keyword arguments, e.g. `disable=True`)."""
        self._progress_bar_config = kwargs

class ModelCpuOffloadMixin:
    """diffusers' `enable_model_cpu_offload` for a pipeline whose components are submodules of one `self.model`.

    Subclasses name the components by their paths in `self.model`:

    - `model_cpu_offload_seq`: chained as diffusers does ("a->b->c"): a component moves to the execution device
      when it is called and moves the one before it in the chain back to the CPU;
    - `_offload_on_use`: components (e.g. the word embeddings, called on their own outside their decoder's forward)
      that move to the execution device when called and stay there until the call ends.

    Every other submodule (small heads, tables) stays on the execution device. After each call all components go
    back to the CPU (`maybe_free_model_hooks`).

    A pipeline whose components are not all inside `self.model` (InternVL-U's generation decoder is its own model)
    names those pipeline attributes in `_offload_pipeline_components`: a path whose first part is one of them is
    read on the pipeline (`"generation_decoder"` is `self.generation_decoder`), every other path on `self.model`.
    """

    model_cpu_offload_seq: str = ""
    _offload_on_use: tuple[str, ...] = ()
    _offload_pipeline_components: tuple[str, ...] = ()

    def _offload_roots(self) -> list[tuple[str, torch.nn.Module]]:
        """(path prefix, module) of `self.model` and of every pipeline component that offloading manages."""
        return [("", self.model)] + [(name + ".", getattr(self, name)) for name in self._offload_pipeline_components]

    def _offload_submodule(self, path: str) -> torch.nn.Module:
        head, _, rest = path.partition(".")
        if head in self._offload_pipeline_components:
            component = getattr(self, head)
            return component.get_submodule(rest) if rest else component
        return self.model.get_submodule(path)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the model on the CPU and move each large component to `device` only while it is needed.

        Args:
            gpu_id: index of the accelerator (default 0); ignored when `device` names one.
            device: the execution device (default: `cuda:{gpu_id}`). Passing "cpu" installs the same hooks with
                nothing to move (useful for testing).
        """
        try:
            from accelerate.hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module
            from accelerate.utils import send_to_device
        except ImportError as error:
            raise ImportError("`enable_model_cpu_offload` needs accelerate: `pip install accelerate`.") from error
        if getattr(self.model, "hf_device_map", None):
            raise ValueError(
                "`enable_model_cpu_offload`: this model was loaded with a `device_map`, so accelerate already places "
                "its parts; load it without one to offload it here."
            )
        device = self._offload_device(gpu_id, device)
        self.remove_all_hooks()

        class _Offload(CpuOffload):
            # accelerate's hook checks only the module's first parameter; a component whose first submodule was
            # loaded on its own (the word embeddings) must still move as a whole.
            def pre_forward(self, module, *args, **kwargs):
                previous = self.prev_module_hook
                if previous is not None and any(p.device.type != "cpu" for p in previous.model.parameters()):
                    previous.offload()
                if any(p.device != self.execution_device for p in module.parameters()):
                    module.to(self.execution_device)
                return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

        chained = [path for path in self.model_cpu_offload_seq.split("->") if path]
        offloaded = chained + list(self._offload_on_use)
        for prefix, root in self._offload_roots():
            root.to("cpu")
            if prefix[:-1] not in offloaded:
                _place_outside(root, prefix, set(offloaded), device)
        hooks, previous = [], None
        for path in offloaded:
            module = self._offload_submodule(path)
            hook = _Offload(execution_device=device, prev_module_hook=previous if path in chained else None)
            add_hook_to_module(module, hook, append=True)
            user_hook = UserCpuOffloadHook(module, hook)
            hooks.append(user_hook)
            if path in chained:
                previous = user_hook
        self._offload_hooks = hooks
        self._offload_execution_device = device
        self.device = device

    @staticmethod
    def _offload_device(gpu_id: int | None, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        if not torch.cuda.is_available():
            raise ValueError(
                "`enable_model_cpu_offload` moves components to an accelerator, and none is available; pass "
                "`device=` (e.g. device='cpu' to try it)."
            )
        return torch.device(f"cuda:{gpu_id or 0}")

    def maybe_free_model_hooks(self) -> None:
        """Move every offloaded component back to the CPU (called at the end of each pipeline call)."""
        for hook in getattr(self, "_offload_hooks", []):
            hook.offload()

    def remove_all_hooks(self) -> None:
        """Remove the offload hooks (the model stays where it is)."""
        for hook in getattr(self, "_offload_hooks", []):
            hook.remove()
        self._offload_hooks = []


def _place_outside(module: torch.nn.Module, prefix: str, offloaded: set[str], device: torch.device) -> None:
    """Move every submodule, parameter and buffer of `module` that is not under an `offloaded` path to `device`."""
    for name, child in module.named_children():
        path = prefix + name
        if path in offloaded:
            continue
        if any(other.startswith(path + ".") for other in offloaded):
            _place_outside(child, path + ".", offloaded, device)
        else:
            child.to(device)
    for name, parameter in module.named_parameters(recurse=False):
        parameter.data = parameter.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        module._buffers[name] = buffer.to(device)
