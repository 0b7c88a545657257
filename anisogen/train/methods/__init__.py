"""Training methods and post-processing steps: the trainer's extension point.

Layout (in the spirit of HF PEFT's ``tuners``)::

    methods/registry.py   MethodContext, ParamGroup, MethodSetup, Method, PostContext, the registries,
                          parse_options, options_help, load_plugins, projector_groups
    methods/defaults.py   per-method, per-stage defaults (Default, BASE_DEFAULTS, infer_stage)
    methods/optim.py      optimizer_groups(): torch param groups with decay / no-decay split
    methods/layers.py     decoder-layer helpers shared by the methods and their analyses
    methods/builtin.py    projector, full, lora
    methods/app/          APP projector merge (post-processor ``app``) + projector spectrum analysis
    methods/gap_init/     Gap-Init (method ``gap_init``) + gap alignment analysis
    methods/mores/        MoReS (method ``mores``) + LMAR analysis

The built-ins register when this package is imported; the three method packages register when
imported, which :func:`load_plugins` (called by :func:`get_method` / :func:`get_postprocessor`) does.
A package that fails to import does not break the others.

Register your own method from any module that gets imported::

    from anisogen.train.methods import Default, MethodSetup, ParamGroup, projector_groups, register_method

    def prepare(ctx):
        ...                                   # modify ctx.model
        return MethodSetup(groups=projector_groups(ctx, "my_method") + [ParamGroup("adapter", params)])

    register_method("my_method", prepare, options={"r": (1, "rank")}, description="...",
                    defaults={"adapter_lr": Default.same(1e-4, "paper X, Table 3")})
"""

from __future__ import annotations

from .defaults import BASE_DEFAULTS, DEFAULT_KEYS, STAGES, Default, infer_stage, method_default, resolve
from .layers import block_hidden, decoder_layers, layer_index, num_decoder_layers, replace_block_hidden
from .optim import no_decay_parameter_names, optimizer_groups
from .registry import (
    METHODS, PLUGIN_ERRORS, PLUGIN_MODULES, POSTPROCESSORS, Method, MethodContext, MethodSetup, ParamGroup,
    PostContext, PostProcessor, check_postprocessors, context_method, get_method, get_postprocessor, load_plugins,
    options_help,
    parse_options, projector_freeze, projector_groups, register_method, register_postprocessor,
)
from .builtin import LORA_OPTIONS, export_peft_adapter, load_peft_adapter  # noqa: E402  (registers the built-ins)

__all__ = [
    "BASE_DEFAULTS", "DEFAULT_KEYS", "LORA_OPTIONS", "METHODS", "PLUGIN_ERRORS", "PLUGIN_MODULES", "POSTPROCESSORS",
    "STAGES", "Default", "Method", "MethodContext", "MethodSetup", "ParamGroup", "PostContext", "PostProcessor",
    "block_hidden", "check_postprocessors", "context_method", "decoder_layers", "export_peft_adapter", "get_method",
    "get_postprocessor",
    "infer_stage", "layer_index", "load_peft_adapter", "load_plugins", "method_default", "no_decay_parameter_names",
    "num_decoder_layers", "optimizer_groups", "options_help", "parse_options", "projector_freeze",
    "projector_groups", "register_method", "register_postprocessor", "replace_block_hidden", "resolve",
]
