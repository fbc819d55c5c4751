"""Model zoo: architecture specs, component modules, folder I/O."""
