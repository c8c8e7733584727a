"""The workspace tools as the agent runs them."""
