"""Tensor-parallel building blocks shared by every tgis_native model family."""
