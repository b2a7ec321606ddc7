"""Closed vocabularies of the catalog, in one place.

Every word here is documented on the site's methodology page; adding one is a schema change (regenerate
the JSON Schema with ``python -m catalog schema``).
"""

from __future__ import annotations

# The awesome list's taxonomy, plus `overview` for the survey.
CATEGORIES: dict[str, str] = {
    "overview": "Surveys and overviews",
    "depth": "Depth-based methods (early exits, layer skipping, recursion)",
    "channel": "Channel-based methods (channel gating, dynamic width)",
    "spatial": "Spatial methods (per pixel, per block, warping, glances and crops)",
    "resolution": "Adaptive resolution methods",
    "transformer": "Transformers",
    "dynamic_weights": "Dynamic filters and weights",
    "quantization": "Quantization",
    "moe": "Mixture of experts",
    "video": "Video (not listed elsewhere)",
}

# Sub-headings of the list, per category.
SUBCATEGORIES: dict[str, tuple[str, ...]] = {
    "overview": (),
    "depth": ("early_exit", "layer_skip", "recursive"),
    "channel": ("channel_gating", "dynamic_width"),
    "spatial": ("per_pixel", "per_block", "warping", "glance", "dilation"),
    "resolution": ("adaptive_resolution",),
    "transformer": ("token", "exit", "region"),
    "dynamic_weights": ("dynamic_filter",),
    "quantization": ("dynamic_precision",),
    "moe": ("experts", "branches"),
    "video": ("temporal",),
}

# The unit whose execution is decided per input.
GRANULARITIES: dict[str, str] = {
    "network": "a whole network of a cascade or ensemble is run or not",
    "exit": "the network stops at an intermediate classifier",
    "layer": "a layer or residual block is run or skipped",
    "iteration": "a shared block is applied a variable number of times",
    "branch": "a branch or path among several is chosen",
    "channel": "individual channels or filters are computed or not",
    "width": "a prefix of the channels (a network width) is chosen",
    "pixel": "individual output positions are computed or not",
    "block": "rectangular blocks of positions are computed or not",
    "region": "a crop, glimpse or warped region is processed",
    "resolution": "the processing resolution is chosen",
    "token": "individual tokens are processed, pruned or halted",
    "frame": "video frames or temporal segments are processed or not",
    "expert": "experts of a mixture are routed to",
    "weight": "the weights themselves are generated from the input",
    "precision": "the numeric precision (bit width) is chosen",
    "none": "not applicable (surveys)",
}

# What takes the decision.
DECISIONS: dict[str, str] = {
    "gate": "a lightweight gating module inside the network",
    "policy_network": "a separate policy network, run before or beside the main network",
    "confidence": "a confidence or entropy test on an intermediate prediction",
    "halting": "a cumulative halting score (adaptive computation time)",
    "saliency": "a saliency or importance score with top-k or winner-take-all selection",
    "threshold": "a threshold on a signal computed from the input (e.g. a frame residual)",
    "router": "a learned router that picks experts or branches (top-k)",
    "generator": "a generator network that produces input-dependent weights",
    "fixed": "a fixed, input-independent pattern (not conditional on the input)",
    "none": "not applicable (surveys)",
}

# How the decision policy is trained.
TRAININGS: dict[str, str] = {
    "supervised": "plain supervised training of the network and its exits or gates",
    "gumbel_softmax": "Gumbel-Softmax / Gumbel-sigmoid relaxation",
    "straight_through": "straight-through gradient estimator",
    "reinforce": "reinforcement learning (REINFORCE or policy gradient)",
    "ponder_cost": "a ponder cost on the amount of computation (ACT-style)",
    "sparsity_loss": "a sparsity or compute-budget regularizer",
    "distillation": "knowledge distillation",
    "multi_stage": "several training stages (e.g. supernet, then gates)",
    "load_balancing": "auxiliary losses that balance the load over experts or branches",
    "training_free": "no policy training (heuristics, fixed patterns or thresholds)",
    "unknown": "not established from the sources read",
    "none": "not applicable (surveys)",
}

TAGS: dict[str, str] = {
    "VID": "video processing",
    "SEG": "semantic segmentation or dense prediction",
    "DET": "object detection",
    "POSE": "pose estimation",
    "SR": "super-resolution or restoration",
    "3D": "3D or point-cloud data",
    "HW": "hardware accelerator design",
    "SEQ": "sequence (non-vision) experiments",
}

IMPLEMENTATION_STATUSES: dict[str, str] = {
    "planned": "no implementation yet",
    "runs": "an implementation runs and is measured",
    "verified": "measured, and its tests compare the sparse path with the masked oracle and the paper's mechanism",
}

SPEEDUP_CLAIMS: dict[str, str] = {
    "yes": "the paper reports measured wall-clock speed",
    "no": "the paper reports only theoretical savings (MACs/FLOPs/operations)",
    "unknown": "not established from the sources read",
}

# How a reported number is interpreted.
QUANTITIES: dict[str, str] = {
    "macs": "multiply-accumulates (often printed as FLOPs)",
    "flops": "floating-point operations, 2 x MACs",
    "ops": "operations in an unstated unit",
    "latency": "wall-clock time per input or batch",
    "throughput": "inputs per second",
    "speedup": "ratio of wall-clock times",
    "energy": "energy per input",
    "accuracy": "a task metric (accuracy, mAP, mIoU, PSNR, ...)",
    "params": "parameter count",
    "other": "anything else, described in the claim",
}

FRAMEWORKS: tuple[str, ...] = (
    "pytorch", "tensorflow", "jax", "chainer", "caffe", "matconvnet", "theano", "torch-lua", "mxnet",
    "paddle", "mindspore", "other",
)
