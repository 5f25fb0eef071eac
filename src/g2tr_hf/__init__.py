"""g2tr-hf: G2TR generation-guided visual token reduction for unified multimodal models, on transformers.

Importing the package registers its configurations, models and processors with the transformers Auto classes, so
that `AutoModel.from_pretrained(path, g2tr_ratio=0.5)` works for a local folder without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_bagel import G2TRBagelConfig
from .configuration_g2tr import G2TRConfig
from .configuration_internvlu import G2TRInternVLUConfig
from .modeling_bagel import G2TRBagelForConditionalGeneration
from .modeling_internvlu import G2TRInternVLUForConditionalGeneration
from .modeling_internvlu_gen import G2TRInternVLUGenerationDecoder, G2TRInternVLUGenerationDecoderConfig
from .pipeline_bagel import G2TRBagelPipeline, G2TRBagelPipelineOutput
from .pipeline_internvlu import G2TRInternVLUPipeline, G2TRInternVLUPipelineOutput
from .processing_bagel import G2TRBagelImageProcessor, G2TRBagelProcessor
from .processing_internvlu import G2TRInternVLUImageProcessor, G2TRInternVLUProcessor
from .reduction import (
    ReductionResult,
    available_methods,
    build_latent_anchors,
    interpolate_channels,
    keep_count,
    latent_cell_index,
    reduce_tokens,
    reduce_tokens_batched,
    register_method,
)
from .tiny import build_tiny, build_tiny_internvlu_generation


# After the configurations above, whose import registers the baselines in `reduction`'s registry.
from .baselines import reduction_options, resolve_method  # noqa: E402


__version__ = "0.1.0.dev0"


def _register_auto_classes(config_class, model_class, processor_class, image_processor_class) -> None:
    # AutoModel returns the full generation-capable model: that is the call our users write.
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)
    try:
        AutoImageProcessor.register(config_class, image_processor_classes={"pil": image_processor_class}, exist_ok=True)
    except ImportError:
        # transformers 5.17 without torchvision exposes AutoImageProcessor as a placeholder that raises on use. The
        # processors load their own image processor class, so only the bare AutoImageProcessor lookup is lost.
        pass


_register_auto_classes(G2TRBagelConfig, G2TRBagelForConditionalGeneration, G2TRBagelProcessor, G2TRBagelImageProcessor)
_register_auto_classes(
    G2TRInternVLUConfig, G2TRInternVLUForConditionalGeneration, G2TRInternVLUProcessor, G2TRInternVLUImageProcessor
)

__all__ = [
    "G2TRBagelConfig",
    "G2TRBagelForConditionalGeneration",
    "G2TRBagelImageProcessor",
    "G2TRBagelPipeline",
    "G2TRBagelPipelineOutput",
    "G2TRBagelProcessor",
    "G2TRConfig",
    "G2TRInternVLUConfig",
    "G2TRInternVLUForConditionalGeneration",
    "G2TRInternVLUGenerationDecoder",
    "G2TRInternVLUGenerationDecoderConfig",
    "G2TRInternVLUImageProcessor",
    "G2TRInternVLUPipeline",
    "G2TRInternVLUPipelineOutput",
    "G2TRInternVLUProcessor",
    "ReductionResult",
    "available_methods",
    "build_latent_anchors",
    "build_tiny",
    "build_tiny_internvlu_generation",
    "interpolate_channels",
    "keep_count",
    "latent_cell_index",
    "reduce_tokens",
    "reduce_tokens_batched",
    "reduction_options",
    "register_method",
    "resolve_method",
]
