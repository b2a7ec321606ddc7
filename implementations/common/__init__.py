"""Pieces shared by the implementations: backbones (``resnet``, ``mobilenet``, ``vit``, gathered in
``backbones``), and whatever else two or more methods need (gates, gradient estimators, data, training).

Importing this package imports nothing else; import the submodule you need.
"""
