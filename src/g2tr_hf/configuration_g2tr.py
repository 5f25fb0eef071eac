"""`G2TRConfig`: the token-reduction knobs that every g2tr_hf model configuration inherits.

All fields live at the top level of the model config so that `from_pretrained(path, g2tr_ratio=0.5)` and
`pipeline(..., model_kwargs={"g2tr_ratio": 0.5})` reach them (transformers only routes a loading kwarg into the
config when the config already has an attribute of that name).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .reduction import validate_anchor_scale, validate_reduction_options

# The baselines register their methods in `reduction`'s registry when imported; importing them with the config
# (which every model, pipeline and Hub folder loads first) makes every method name valid wherever a config exists,
# and ships their files with a Hub folder's remote code. `reduction` itself imports neither, so there is no cycle.
from .baselines import METHOD_PRESETS as _METHOD_PRESETS  # noqa: E402,F401
from .in_llm import IN_LLM_METHODS as _IN_LLM_METHODS  # noqa: E402,F401


class G2TRConfig(PreTrainedConfig):
    r"""
    Base configuration holding the G2TR reduction options. Model configurations (BAGEL, InternVL-U) subclass it.

    Args:
        g2tr_ratio (`float`, *optional*, defaults to 1.0):
            Keep ratio of the understanding (ViT) tokens of every input image, in (0, 1]. `1.0` turns the reduction
            off and gives the unreduced model bit for bit. The paper's setting is `0.5`. The default is off so
            that a converted checkpoint behaves like upstream until a user opts in.
        g2tr_min_keep (`int`, *optional*, defaults to 32):
            Lower bound on the number of kept tokens per image (the official BAGEL value).
        g2tr_method (`str`, *optional*, defaults to `"g2tr"`):
            Key of the selection method in the reduction registry (`g2tr_hf.reduction.available_methods()`).
        g2tr_latent_pool (`int`, *optional*, defaults to 2):
            Pooling factor applied to the patchified VAE latent grid before it serves as anchors.
        g2tr_merge (`bool`, *optional*, defaults to `True`):
            Whether dropped tokens are averaged into their most similar kept token (`False`: plain pruning).
        g2tr_merge_scaling (`float`, *optional*, defaults to 1.0):
            Weight of the kept token itself in the merge average.
        g2tr_cell_mapping (`str`, *optional*, defaults to `"corner"`):
            How a ViT token is assigned to a latent cell: `"corner"` (the official top-left-corner rule) or
            `"center"`.
        g2tr_anchor_scale (`float`, *optional*, defaults to 1.0):
            Resolution at which an image is VAE-encoded for its anchors, relative to the full-resolution encode.
            `1.0` is the official behaviour. `0.5` encodes a half-size copy whose latent lands directly on the pooled
            anchor grid (pooling `g2tr_latent_pool * 0.5` instead of `g2tr_latent_pool`), about 4x less encode
            compute; the anchors are then an approximation, so measure the keep-set agreement on your weights
            (`g2tr_hf.profiling.anchor_scale_agreement`). `g2tr_latent_pool * g2tr_anchor_scale` must be a whole
            number. Only understanding prefill encodes images for anchors alone; editing reuses the latents of its
            VAE context blocks, which are always full resolution.
    """

    model_type = "g2tr"

    g2tr_ratio: float | int = 1.0
    g2tr_min_keep: int = 32
    g2tr_method: str = "g2tr"
    g2tr_latent_pool: int = 2
    g2tr_merge: bool = True
    g2tr_merge_scaling: float | int = 1.0
    g2tr_cell_mapping: str = "corner"
    g2tr_anchor_scale: float | int = 1.0

    def __post_init__(self, **kwargs):
        self.validate_g2tr()
        super().__post_init__(**kwargs)

    def __setattr__(self, key: str, value) -> None:
        # `None` for a reduction option means "the config's value", as it does per call (`g2tr_ratio=None`):
        # `from_pretrained(path, g2tr_ratio=None)` assigns the override over the stored value, so keep that value
        # (or the default, while the config is being built).
        if value is None and key.startswith("g2tr_") and key in self.__dataclass_fields__:
            if key in self.__dict__:
                return
            value = self.__dataclass_fields__[key].default
        super().__setattr__(key, value)

    def validate_g2tr(self) -> None:
        """Raise `ValueError` naming the offending field when a reduction option is out of range.

        `from_pretrained` overrides are assigned after `__post_init__`, so models call this again before use.
        """
        validate_reduction_options(
            ratio=self.g2tr_ratio,
            min_keep=self.g2tr_min_keep,
            method=self.g2tr_method,
            merge_scaling=self.g2tr_merge_scaling,
            cell_mapping=self.g2tr_cell_mapping,
            latent_pool=self.g2tr_latent_pool,
            prefix="g2tr_",
        )
        validate_anchor_scale(self.g2tr_anchor_scale, self.g2tr_latent_pool, prefix="g2tr_")

    @property
    def g2tr_anchor_pool(self) -> int:
        """Pooling factor applied to the anchor latent actually encoded: `g2tr_latent_pool * g2tr_anchor_scale`."""
        return validate_anchor_scale(self.g2tr_anchor_scale, self.g2tr_latent_pool, prefix="g2tr_")

    def resolve_g2tr_ratio(self, g2tr_ratio: float | None = None) -> float:
        """The keep ratio of one call: `g2tr_ratio` when given (validated), else the config's.

        The config itself is validated again first, because `from_pretrained(..., g2tr_ratio=...)` assigns its
        overrides after `__post_init__` has run.
        """
        self.validate_g2tr()
        if g2tr_ratio is None:
            return float(self.g2tr_ratio)
        validate_reduction_options(ratio=g2tr_ratio, prefix="g2tr_")
        return float(g2tr_ratio)

    def g2tr_reduction_kwargs(self) -> dict:
        """The keyword options of `reduction.reduce_tokens` held by this config (everything but the ratio)."""
        return {
            "min_keep": self.g2tr_min_keep,
            "method": self.g2tr_method,
            "merge": self.g2tr_merge,
            "merge_scaling": self.g2tr_merge_scaling,
            "cell_mapping": self.g2tr_cell_mapping,
        }


__all__ = ["G2TRConfig"]
