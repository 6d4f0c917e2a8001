from .decoder import KVCache
from .flow_head import FlowHead, FlowNet
from .nextstep import LossOutput, NextStep, patchify, unpatchify

__all__ = ["FlowHead", "FlowNet", "KVCache", "LossOutput", "NextStep", "patchify", "unpatchify"]
