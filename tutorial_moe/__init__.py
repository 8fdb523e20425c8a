"""tutorial_moe: Mixture of Experts, understood by running it.

The package behind the book: routers, experts, dispatch, losses, metrics and a training loop,
each in its own small module and each tested against a slow, obvious oracle.
"""
from ._validate import set_finite_checks
from .data import DataSplit, load_digits, load_two_domains
from .experts import ConvExpert, ConvGate, DenseGate, ExpertBank, MLPExpert, SwiGLUExpert
from .moe import MoE, MoELayer, SoftMoELayer, moe_modules, total_aux_loss
from .routing import (
    ExpertChoiceRouter,
    HashRouter,
    HierarchicalRouter,
    OracleRouter,
    Routing,
    SoftmaxRouter,
    ThresholdRouter,
    TopKRouter,
)
from .runtime import device, full_mode, progress, seed_everything

__version__ = "0.1.0"

__all__ = [
    "DataSplit", "load_digits", "load_two_domains",
    "ConvExpert", "ConvGate", "DenseGate", "ExpertBank", "MLPExpert", "SwiGLUExpert",
    "MoE", "MoELayer", "SoftMoELayer", "moe_modules", "total_aux_loss",
    "ExpertChoiceRouter", "HashRouter", "HierarchicalRouter", "OracleRouter", "Routing", "SoftmaxRouter",
    "ThresholdRouter", "TopKRouter",
    "device", "full_mode", "progress", "seed_everything", "set_finite_checks",
]
