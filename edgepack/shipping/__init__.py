"""Getting a bundle onto the fleet: signing, OCI registries, the device-side install, the fleet view.

One concept per module: ``signing`` (Ed25519 over manifest.json), ``registry`` (push/pull as an OCI
artifact through oras), ``oci`` (the artifact's media types, annotations and the checks on a served
manifest), ``install`` (versioned folders and an atomically switched ``current`` link), ``switch`` (the
crash-safe root primitives: atomic JSON and links, the lock, the switch journal), ``device`` (is this
machine the bundle's device), ``fleet`` (reading the status files devices report)."""
