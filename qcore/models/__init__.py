"""The float models the lab knows: the bundled net's architecture, checkpoints and the bundled weights."""
