import json, uuid
from agentplane.toolexec.v1 import toolexec_service_pb2 as t
from tests.hostile.world import start_world

async def test_nproc(module_settings, make_token, module_workspaces_dir):
    w = await start_world(module_settings, make_token, module_workspaces_dir, default_driver="local", seed_users=False)
    try:
        stub = w.toolexec("alice")
        a = (await stub.CreateWorkspace(t.CreateWorkspaceRequest(name="a"))).workspace.id
        b = (await w.toolexec("bob").CreateWorkspace(t.CreateWorkspaceRequest(name="b"))).workspace.id
        await w.agent_connected("alice", a); await w.agent_connected("bob", b)
        async def ex(user, ws, cmd):
            r = await w.toolexec(user).CallTool(t.CallToolRequest(workspace_id=ws, tool_call_id=uuid.uuid4().hex, name="execute", arguments_json=json.dumps({"command": cmd, "timeout_seconds": 60})), timeout=90)
            return r.content
        print("A:", (await ex("alice", a, "n=0; for i in $(seq 1 600); do sleep 60 & n=$((n+1)); done 2>/dev/null; echo started $n"))[-300:])
        print("B:", (await ex("bob", b, "echo hi from b; sleep 0.1 & wait; echo done"))[-300:])
    finally:
        await w.stop()
