"""`agentplane demo` (`make demo`): the product end to end on this machine in one command."""
