"""Memory layout of a model's parameters: channels_last in eval, NCHW in training."""

from __future__ import annotations

import torch
import torch.nn as nn


class ChannelsLastInEval(nn.Module):
    """A model whose 4-D parameters and buffers are channels_last in eval and NCHW in training.

    A model that feeds channels_last activations to its convolutions needs channels_last weights as
    well: with NCHW weights, oneDNN converts the weight on every call (measured: a 512-channel 3x3 conv
    on an 8x8 channels_last map took 15 ms with an NCHW weight and 3 ms with a channels_last one), which
    would slow a dense baseline's late layers as much as a dynamic model's. Training stays NCHW: the CPU
    backward of a strided 1x1 conv on channels_last tensors crashed torch 2.13 (segfault).
    `eval_channels_last()` can turn the switch off (default: on).
    """

    def eval_channels_last(self) -> bool:
        return True

    def train(self, mode: bool = True) -> ChannelsLastInEval:
        super().train(mode)
        if self.eval_channels_last():
            self.to(memory_format=torch.contiguous_format if mode else torch.channels_last)
        return self
