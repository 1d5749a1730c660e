"""Plug-ins for other frameworks: :mod:`biformer.integrations.mm` registers the backbone with OpenMMLab."""
