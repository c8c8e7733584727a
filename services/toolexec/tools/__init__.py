"""The workspace tools: definitions (for the model), validation and implementations."""
