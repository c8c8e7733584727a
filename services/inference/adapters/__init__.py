"""Provider adapters: turn a GenerateRequest into an SDK call and the SDK's stream into ProviderEvents."""
