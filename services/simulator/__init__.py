"""The LLM simulator: an OpenAI- and Anthropic-compatible HTTP server with scripted replies.

Used by tests, demos and load tests. Start it with `agentplane simulator` or in-process with
`services.simulator.server.start_simulator`. The script format is documented in docs/simulator.md.
"""
