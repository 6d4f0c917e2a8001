from .flow import SAMPLERS, FlowSampler, guide, shift_timesteps

__all__ = ["SAMPLERS", "FlowSampler", "guide", "shift_timesteps"]
