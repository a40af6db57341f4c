"""Getting a bundle onto the fleet: signing, OCI registries, the device-side install, the fleet view.

One concept per module: ``signing`` (Ed25519 over manifest.json), ``registry`` (push/pull as an OCI
artifact through oras), ``install`` (versioned folders and an atomically switched ``current`` link),
``fleet`` (reading the status files devices report)."""
