"""Pipeline loading (diffusers), the tiny builder, and helpers that address the two experts by name."""

from wanexp.models.experts import (EXPERTS, boundary_timestep, expert_for_timestep, experts, install_scope_hooks,
                                   install_timestep_hooks)
from wanexp.models.loading import held_bytes, load_pipeline, model_fingerprint, pipeline_bytes

__all__ = ["EXPERTS", "boundary_timestep", "expert_for_timestep", "experts", "install_scope_hooks", "install_timestep_hooks",
           "held_bytes", "load_pipeline", "model_fingerprint", "pipeline_bytes"]
