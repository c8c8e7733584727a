"""Token revocation: an admin revokes a token by id; every service refuses it soon after.

The list lives in Postgres (`token_revocations`), served by the config process
(`agentplane.config.v1.TokenService`); each service keeps a copy in memory (`RevocationList`),
refreshed every few seconds, that its auth interceptor consults on every call.
"""
