"""A faithful, self-contained simulator of Apiframe's v2 API (placeholder: being written)."""
