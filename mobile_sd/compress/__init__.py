"""Compression: quantization and palettization of components before export."""
