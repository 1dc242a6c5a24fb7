"""Layers trained by implicit backprop (IB), drop-in for nn.Linear + activation and nn.RNN."""
from torchopt_ext.nn.convert import ConversionReport, implicit
from torchopt_ext.nn.functional import ImplicitLinearFunction, implicit_linear
from torchopt_ext.nn.linear import ImplicitLinear
from torchopt_ext.nn.modules import Arctan, Smoothstep
from torchopt_ext.nn.rnn import ImplicitRNN

__all__ = ["ImplicitLinear", "ImplicitRNN", "implicit", "ConversionReport", "Arctan", "Smoothstep",
           "ImplicitLinearFunction", "implicit_linear"]
