"""Pipeline loading (diffusers), the tiny builder, and helpers that address the two experts by name."""

from wanexp.models.experts import EXPERTS, boundary_timestep, expert_for_timestep, experts, install_timestep_hooks
from wanexp.models.loading import load_pipeline, model_fingerprint

__all__ = ["EXPERTS", "boundary_timestep", "expert_for_timestep", "experts", "install_timestep_hooks",
           "load_pipeline", "model_fingerprint"]
