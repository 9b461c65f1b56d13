"""`batchflux validate` and `batchflux plan` (placeholder: being written)."""
