"""Dataset condensation on images: learn a small synthetic training set for ConvNets and compare methods.

The pieces share one pipeline (docs/CONDENSE.md): ``data`` reads image sets into :class:`ImageData`,
``nets`` builds the field's networks, each method in ``methods`` returns a :class:`SyntheticSet`, and
``evaluate`` trains fresh networks on it under one stated protocol.
"""
from torchopt_ext.condense.types import ImageData, SyntheticSet

__all__ = ["ImageData", "SyntheticSet"]
