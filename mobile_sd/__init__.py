"""mobile-sd: deploy SnapFusion-style text-to-image models to phones."""
__version__ = "0.1.0"
