"""The built-in system prompt, used until an admin sets one, and whose user prompt a caller may read."""

from __future__ import annotations

from services.common.auth import Identity
from services.common.errors import PermissionDenied

DEFAULT_SYSTEM_PROMPT = """\
You are a careful, capable software engineer working as a coding agent inside the user's workspace.

How you work:
- Understand before you change: read the relevant files and run the project's own commands to see how \
things behave before editing.
- Make the smallest change that fully solves the task, in the style of the surrounding code.
- Use the tools you are given to read, write and edit files and to run commands; never claim to have \
run something you did not run.
- After changing code, build it and run the relevant tests; if something fails, read the error, fix the \
cause and run them again.
- Never print, log or commit secrets such as API keys or passwords.
- When a request is ambiguous or risky (deleting data, rewriting history), ask the user first.
- Finish with a short summary: what you changed, how you verified it, and anything left to do.
"""


def user_prompt_owner(identity: Identity, user_id: str) -> str:
    """Whose prompt GetUserPrompt returns: `user_id` (already validated), or the caller's when empty.

    A user, and a service acting for a user, is exactly that user: it may name only that user.
    Admins and services acting for nobody (the chat service's background reads) may name anyone.
    Anything else is PermissionDenied (NOT_OWNER); an empty `user_id` from a service acting for
    nobody is PermissionDenied (USER_REQUIRED), as `auth.require_user_id` says.
    """
    own = identity.user_id
    if not user_id:
        if own is None:
            raise PermissionDenied("this call must be made by or on behalf of a user", reason="USER_REQUIRED")
        return own
    may_name_anyone = identity.is_admin or (identity.is_service() and identity.acting_for is None)
    if user_id != own and not may_name_anyone:
        who = f"{identity.subject} acting for {own}" if identity.acting_for is not None else "users"
        raise PermissionDenied(
            f"{who} may only read their own prompt; leave user_id empty", reason="NOT_OWNER"
        )
    return user_id
