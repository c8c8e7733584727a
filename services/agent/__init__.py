"""The workspace agent: the one process inside a workspace that touches its files and processes.

It dials out to toolexec (`WorkspaceAgentService.Connect`) and never listens; it holds only
toolexec's address and its workspace's agent token. Light by design: it imports grpc, the
generated protos and its own modules, nothing of the control plane's services.
"""
