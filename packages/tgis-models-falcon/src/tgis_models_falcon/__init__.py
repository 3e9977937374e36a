"""Falcon (7B, 40B, 180B, RW) on tgis's tensor-parallel tgis_native engine."""
