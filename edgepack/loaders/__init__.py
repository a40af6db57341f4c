"""One loader per source format. Each returns a ModelArtifact (or a torch module to export)."""
