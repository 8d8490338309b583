"""CPU tactics (oneDNN through torch)."""
