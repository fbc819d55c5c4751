"""Exporters: turn mobile-sd components into deployable artifacts, and check what they wrote."""
