"""Small shared helpers (files, hashing, versions, memory)."""
