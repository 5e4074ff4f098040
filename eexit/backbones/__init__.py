"""Backbone specs: where exits sit on each backbone family (one module per family).

The built-in specs are imported here and register themselves on import (timm's registry pattern), so
``eexit.backbones.base`` (the spec classes and the registry) imports no spec. Matchers only look at classes whose
module is already loaded (``loaded_class``), so none of this imports timm or transformers.
"""

# Catch-all specs (hf_auto, unsupported) defer to every other spec, so the order here does not matter.
from . import (  # noqa: F401
    dynamic_perceiver,
    grit,
    hf_auto,
    hf_beit,
    hf_dinov2,
    hf_swin,
    hf_vit,
    t2t_vit,
    timm_beit,
    timm_eva,
    timm_swin,
    timm_vit,
    unsupported,
)
from .base import BackboneSpec, StagedSpec, find_spec, get_spec, list_specs, register_spec, seal_builtins
from .generic import GenericSpec

seal_builtins()

__all__ = ["BackboneSpec", "GenericSpec", "StagedSpec", "find_spec", "get_spec", "list_specs", "register_spec"]
