"""Triton kernels, imported as ``drasclr.kernels`` (this folder is mapped by setup.py).

Empty of kernels until the fused Loc-CondConv kernels land.
"""
