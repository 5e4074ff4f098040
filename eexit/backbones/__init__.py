"""Backbone specs: where exits sit on each backbone family (one module per family)."""

from .base import BackboneSpec, find_spec, get_spec, list_specs, register_spec
from .generic import GenericSpec

__all__ = ["BackboneSpec", "GenericSpec", "find_spec", "get_spec", "list_specs", "register_spec"]
