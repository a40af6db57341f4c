"""Pipeline stages: each takes a ModelArtifact (or source) and returns a new one."""
