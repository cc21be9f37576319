"""emalora-fast."""
