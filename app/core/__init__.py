"""Settings, database and security primitives of the service."""
