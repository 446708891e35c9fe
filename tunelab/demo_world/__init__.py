"""The built-in demo's world: a generated corpus, labeled support tickets and general-knowledge probes."""
