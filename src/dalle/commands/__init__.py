"""Command groups of the `dalle` CLI (see dalle.cli)."""
