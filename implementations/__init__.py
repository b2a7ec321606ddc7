"""Minimal, executable reference implementations of dynamic networks, one module per catalog entry.

``implementations/<category>/<id>.py`` follows Contract 2 of the design (``Config``, ``build``,
``build_baseline``, ``example_input``); shared pieces live in ``implementations.common``.
"""
