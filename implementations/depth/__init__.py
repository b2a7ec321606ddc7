"""Dynamic depth: early exits, layer skipping and halting (one module per catalog entry)."""
