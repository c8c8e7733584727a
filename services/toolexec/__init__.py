"""The toolexec service."""
